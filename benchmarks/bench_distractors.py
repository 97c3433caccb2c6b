"""What distractors cost a short list's detect, in one run (issue 31's latency target: <= 1.3x).

The demo model on generated shapes images, a 3-name list, text embeddings already cached (the
first call of each setting is a warm-up): ``detect`` with the model's distractors (its own 12
names) against ``--distractors none``, and against a CLIP-sized list (the shipped 334 common
object names, scored as the CLIP presets do), alternating the settings image by image so load
on a shared machine falls on all of them alike. Prints the median seconds per image and each
ratio to ``none``.

    python benchmarks/bench_distractors.py --images 30 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from regionclip import RegionCLIP
from regionclip.data.shapes import render_shapes_image

LABELS = ["red circle", "blue square", "green triangle"]
SETTINGS = {"none": "none", "default (demo: 12 names)": None, "common (334 names)": "common"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=30, help="generated images, each detected once per setting")
    ap.add_argument("--size", type=int, default=288, help="image side in pixels")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = RegionCLIP.from_pretrained("demo", device="cpu")
    rng = np.random.default_rng(123)
    images = [render_shapes_image(rng, (args.size, args.size), empty_prob=0.0)[0] for _ in range(args.images)]
    for spec in SETTINGS.values():  # warm-up: text and distractor embeddings cached
        model.detect(images[0], LABELS, distractors=spec)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for img in images:
        for name, spec in SETTINGS.items():
            start = time.perf_counter()
            model.detect(img, LABELS, distractors=spec)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["none"])
    print(f"demo model, CPU, {args.threads} threads, {args.images} images {args.size}x{args.size}, "
          f"labels {', '.join(LABELS)}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:28s} {med * 1000:7.1f} ms/image   {med / base:.3f}x none")


if __name__ == "__main__":
    main()
