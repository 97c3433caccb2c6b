"""Time and peak memory of detection on one very large JPEG, with the tiny test models.

Writes a 12000x9000 JPEG with two shapes (or takes ``--image``), then, for each checkout given
(default: this one), runs ``tests/conftest.py:tiny_model("vit", "crop").detect(path, 2 labels)``
in a fresh process and prints the detection time and the process's peak RSS. Comparing two
checkouts in one call gives a before/after ratio from one run:

    git worktree add /tmp/before 439e311
    python benchmarks/bench_large_image.py --tree /tmp/before --tree .

``--tile 320`` runs each checkout a second time with tiled detection (``detect(..., tile=320)``:
the JPEG decoded whole, about 1600 windows streamed eight at a time); its peak RSS is what
tiling costs in memory on a 100-megapixel photo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
tree, image, tile = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None
sys.path[:0] = [tree, tree + "/tests"]
from conftest import TINY_CONFIGS, tiny_model
from regionclip.weights import register_clip_config
for name, cfg in TINY_CONFIGS.items():  # pytest registers them in pytest_configure; a plain process must itself
    register_clip_config(name, cfg)
model = tiny_model("vit", "crop")
start = time.perf_counter()
dets = model.detect(image, ["red circle", "green square"], score_threshold=0.0, **({"tile": tile} if tile else {}))
print(json.dumps({"tree": tree, "tile": tile, "detect_s": round(time.perf_counter() - start, 2),
                  "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "boxes": len(dets)}))
"""


def write_image(path: Path, width: int = 12000, height: int = 9000) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(230, 20, 20))
    draw.rectangle((width * 5 // 8, height // 2, width * 7 // 8, height * 7 // 8), fill=(20, 220, 20))
    img.save(path, quality=90)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=Path, help="a large JPEG (default: write a 12000x9000 one)")
    p.add_argument("--tree", action="append", help="a regionclip checkout (repeatable; default: this one)")
    p.add_argument("--tile", type=int, default=0, help="also detect with this tile size (0: only without tiles)")
    a = p.parse_args(argv)
    trees = [str(Path(t).resolve()) for t in (a.tree or [Path(__file__).resolve().parent.parent])]
    with tempfile.TemporaryDirectory() as tmp:
        image = a.image or write_image(Path(tmp) / "big.jpg")
        for tree in trees:
            for tile in sorted({0, a.tile}):
                out = subprocess.run([sys.executable, "-c", CHILD, tree, str(image), str(tile)], capture_output=True,
                                     text=True)
                print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"{tree}: failed\n{out.stderr[-2000:]}",
                      flush=True)


if __name__ == "__main__":
    main()
