"""How much sharing a padded batch changes results, against one image at a time.

Images of different sizes share one zero-padded batch in ``detect``, ``eval`` and training.
Convolutions near an image's bottom/right border then see the padding of the batch rather than
their own zero padding, so border features can move a little. This script measures it on a
COCO-format set (shapes val by default) with any model:

* proposals: for each image, the mean best-IoU of its batched proposals to its own alone;
* embeddings: cosine between the region embeddings of the SAME boxes (the image's own
  proposals) computed in the padded batch and alone, in the model's mode and in pool mode;

    regionclip make-shapes data/shapes --train 0 --val 200 --min-side 192 --max-side 320
    python benchmarks/padding_effect.py --images data/shapes/val --model demo --batch-size 8

For the effect on AP, compare ``regionclip eval ... --batch-size 1`` with ``--batch-size 8``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torchvision.ops import box_iou

from regionclip import RegionCLIP
from regionclip.batch import aspect_groups
from regionclip.io import IMAGE_EXTENSIONS


def measure(model: RegionCLIP, paths: list[Path], batch_size: int) -> dict:
    loaded = model.load(paths)
    ious, cosines = [], []
    with torch.inference_mode():
        for idx in aspect_groups([x.pixels.shape[:2] for x in loaded], batch_size):
            batch = model.batch([loaded[i] for i in idx])
            boxes, _ = model.propose(batch)
            together = model.embed(batch, boxes)
            for j, i in enumerate(idx):
                alone = model.batch([loaded[i]])
                own, _ = model.propose(alone)
                if len(own[0]) and len(boxes[j]):
                    ious.append(float(box_iou(boxes[j], own[0]).max(dim=1).values.mean()))
                start = sum(len(b) for b in boxes[:j])
                part = together[start:start + len(boxes[j])]
                single = model.embed(alone, [boxes[j]])
                cosines += (part * single).sum(dim=1).tolist()
    return {"images": len(paths), "proposal_best_iou_mean": statistics.fmean(ious),
            "cosine_mean": statistics.fmean(cosines), "cosine_min": min(cosines),
            "cosine_p01": statistics.quantiles(cosines, n=100)[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="folder of images")
    p.add_argument("--model", default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=64, help="first N images (sorted by name)")
    a = p.parse_args(argv)
    paths = sorted(q for q in a.images.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)[: a.limit]
    for mode in dict.fromkeys([None, "pool"]):
        model = RegionCLIP.from_pretrained(a.model, mode=mode, device="cpu")
        r = measure(model, paths, a.batch_size)
        print(f"{a.model} mode={model.cfg.mode} batch {a.batch_size}: " + ", ".join(
            f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
