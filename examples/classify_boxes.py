"""Classify boxes you already have (from another detector, a tracker, a human): top labels per box.

Shows ``model.detect(image, labels, boxes=xyxy, top_k=k)``: the proposal stage is skipped, each
given box (``x1, y1, x2, y2`` in pixels of the image) is embedded and matched against the labels,
and the result holds each box's ``k`` best labels, box by box in input order, best label first,
with no threshold or NMS applied. ``model.encode_regions(image, boxes)`` gives the embeddings
themselves, for your own matching.

Run (offline, demo model; 8 s of CPU time, 6 of them importing torch):

    python examples/classify_boxes.py                # a generated shapes image and its true boxes
    python examples/classify_boxes.py photo.jpg --boxes "10,20,110,140;200,40,260,90" \\
        --labels "dog,cat,bicycle" --model rn50 --top-k 2

With ``--save PATH`` the image is written with each box's best label.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from regionclip import RegionCLIP
from regionclip.data.shapes import CATEGORIES, render_shapes_image
from regionclip.io import load_image
from regionclip.visualize import save_annotated


def parse_boxes(text: str) -> torch.Tensor:
    """``"x1,y1,x2,y2;x1,y1,x2,y2"`` -> (N, 4) float tensor."""
    rows = [[float(v) for v in part.split(",")] for part in text.split(";") if part.strip()]
    if not rows or any(len(r) != 4 for r in rows):
        raise SystemExit(f"--boxes must be 'x1,y1,x2,y2' groups separated by ';', but got {text!r}")
    return torch.tensor(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", help="image file (default: a generated shapes image)")
    parser.add_argument("--boxes", help="'x1,y1,x2,y2;...' in pixels (default with the generated image: its true boxes)")
    parser.add_argument("--labels", default=",".join(CATEGORIES), help="comma-separated vocabulary (default: the 12 shapes names)")
    parser.add_argument("--model", default="demo", help="preset name or preset YAML (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="labels to show per box (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="which generated image (default: %(default)s)")
    parser.add_argument("--save", type=Path, help="write the image with each box's best label here (.jpg or .png)")
    args = parser.parse_args(argv)

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    truth: list[str | None]
    if args.image is not None:
        if args.boxes is None:
            parser.error("an image needs --boxes")
        image = load_image(args.image)
        boxes = parse_boxes(args.boxes)
        truth = [None] * len(boxes)
    else:
        image, objects = render_shapes_image(np.random.default_rng(args.seed), size=(288, 384), empty_prob=0.0)
        boxes = parse_boxes(args.boxes) if args.boxes else torch.tensor([box for box, _ in objects], dtype=torch.float)
        truth = [name for _, name in objects] if not args.boxes else [None] * len(boxes)

    model = RegionCLIP.from_pretrained(args.model)
    k = min(args.top_k, len(labels))
    dets = model.detect(image, labels, boxes=boxes, top_k=k).cpu()
    # k rows per box, box by box in input order, best label first.
    results = []
    for i, box in enumerate(boxes.tolist()):
        rows = dets[list(range(i * k, (i + 1) * k))]
        top = list(zip(rows.names, rows.scores.tolist()))
        results.append({"box": box, "top": top, "truth": truth[i]})
        shown = ", ".join(f"{name} {score:.2f}" for name, score in top)
        note = "" if truth[i] is None else f"   (drawn: {truth[i]}{'' if truth[i] == top[0][0] else ', MISSED'})"
        print(f"box {i} [{', '.join(f'{v:.0f}' for v in box)}]: {shown}{note}")
    if args.save:
        best = dets[list(range(0, len(dets), k))]
        print(f"saved: {save_annotated(args.save, image, best)}")
    return results


if __name__ == "__main__":
    main()
