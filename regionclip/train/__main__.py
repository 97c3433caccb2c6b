"""``python -m regionclip.train CONFIG [--set k=v] [--out DIR] [--resume PATH]``: the entry for torchrun.

``torchrun --nproc_per_node 2 -m regionclip.train configs/train/shapes_demo.yaml`` runs DDP;
the arguments are those of ``regionclip train``.
"""

import sys

from regionclip_cli.main import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
