"""``python -m regionclip.label SOURCE... --labels ... --out DIR``: the entry for torchrun.

``torchrun --nproc_per_node 8 -m regionclip.label images/ --labels "dog,cat" --out labels/``:
each rank (``RANK``/``WORLD_SIZE`` from the environment) writes its shards; the arguments are
those of ``regionclip label``.
"""

import sys

from regionclip_cli.main import main

if __name__ == "__main__":
    main(["label", *sys.argv[1:]])
