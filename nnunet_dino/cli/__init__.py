"""Command-line tools of nnunet-dino (installed as nnUNetv2_dino_* console scripts)."""
