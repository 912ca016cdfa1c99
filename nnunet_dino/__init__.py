"""nnunet-dino: DINOv3/DINOv2 foundation models inside nnU-Net v2.

Kept free of heavy imports: the interpreter start-up hook (``_ext_trainer_env``) imports this package.
Layers import downwards only: backbone -> guidance -> networks -> training (trainer logic).
"""
__version__ = "0.1.0"
