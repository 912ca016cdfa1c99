#!/usr/bin/env python
"""Same as the installed command ``nnUNetv2_dino_add_highres_plans`` (for a source checkout):

    python plans/add_highres_plans.py -d 990 --size 896

The logic is nnunet_dino.planning.highres; see plans/README.md and docs/highres_plans.md.
"""
import sys

from nnunet_dino.planning.highres_cli import main

if __name__ == "__main__":
    sys.exit(main())
