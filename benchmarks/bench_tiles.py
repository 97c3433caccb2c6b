"""Tiled detection against whole-image detection on large images with small objects.

Over a COCO set (default: written here with ``make_shapes``: 2048 x 2048 images, 12-40 px shapes,
up to 60 an image), the demo model runs each image twice, without and with ``tile``, each in one
``Predictor.stream_runs`` pass with two selections: eval's (every label kept, no label-blind NMS,
100 boxes: AP50) and detect's (the preset's threshold and one box per object, up to 100 boxes:
recall at IoU 0.5 and the two-box rate). It prints, as JSON lines:

- ``AP50`` (pycocotools) and ``recall50``: the share of objects a detection of their name
  overlaps at IoU >= 0.5, at detect's threshold;
- ``two_boxes``: of the objects that straddle a window border (an inner edge of some window
  cuts their box), the share on which two or more detections lie (each mostly inside the object:
  intersection >= half the detection's area); the same objects without tiles for reference;
- ``seconds_per_image`` of plain ``detect`` with and without tiles over ``--time-images``
  images, alternating image by image in this one process, and their ratio.

Peak memory on a 100-megapixel JPEG: ``bench_large_image.py --tile 320``.

    python benchmarks/bench_tiles.py --images 50 --seed 2 --tile 320 --time-images 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

def straddles(gt: torch.Tensor, windows: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(G,) bool: some window's inner edge (inside the image) runs through the box's interior."""
    h, w = size
    cut = torch.zeros(len(gt), dtype=torch.bool)
    for x0, y0, x1, y1 in windows.tolist():
        for edge, axis, inner in ((x0, 0, x0 > 0), (x1, 0, x1 < w), (y0, 1, y0 > 0), (y1, 1, y1 < h)):
            if not inner:
                continue
            across = (gt[:, axis] < edge) & (gt[:, axis + 2] > edge)
            other = (gt[:, 1 - axis + 2] > (y0, x0)[axis]) & (gt[:, 1 - axis] < (y1, x1)[axis])  # within the window's span
            cut |= across & other
    return cut


def lying_on(dets: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(G,) count of detections that lie mostly (>= half their area) inside each object's box."""
    if not len(dets) or not len(gt):
        return torch.zeros(len(gt), dtype=torch.long)
    lt = torch.maximum(dets[:, None, :2], gt[None, :, :2])
    rb = torch.minimum(dets[:, None, 2:], gt[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (dets[:, 2:] - dets[:, :2]).prod(dim=1).clamp(min=1e-6)
    return (inter / area[:, None] >= 0.5).sum(dim=0)


def evaluate(predictor, coco, paths, ids, tile, labels, batch_size, grid) -> dict:
    """One pass (``tile`` None: whole images) with eval's and detect's selections; ``grid``: the
    ``Tiling`` whose borders define the straddling objects, the same for both passes."""
    from regionclip.evaluate import coco_map

    eval_run = {"labels": labels, "top_k": 3, "score_threshold": 0.0, "agnostic_nms": False, "max_detections": 100}
    detect_run = {"labels": labels, "max_detections": 100}
    names = {c["name"]: c["id"] for c in coco.cats.values()}
    records, found, objects, cut_objects, cut_two = [], 0, 0, 0, 0
    start = time.perf_counter()
    for p in predictor.stream_runs(paths, [eval_run, detect_run], batch_size=batch_size, tile=tile):
        image_id = ids[p.index]
        ev, de = (d.cpu() for d in p.runs)
        records += ev.to_records(image_id=image_id, category_ids=names)
        anns = coco.imgToAnns[image_id]
        if not anns:
            continue
        gt = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        gt[:, 2:] += gt[:, :2]
        gt_labels = torch.tensor([labels.index(coco.cats[a["category_id"]]["name"]) for a in anns])
        iou = box_iou(gt, de.boxes_xyxy.float()) if len(de) else torch.zeros(len(gt), 0)
        same = gt_labels[:, None] == de.label_ids[None]
        found += int(((iou >= 0.5) & same).any(dim=1).sum())
        objects += len(gt)
        h, w = p.original_size
        windows = grid.windows(h, w)
        across = straddles(gt, windows, (h, w))
        cut_objects += int(across.sum())
        cut_two += int((lying_on(de.boxes_xyxy.float(), gt)[across] >= 2).sum())
    seconds = time.perf_counter() - start
    ap50 = coco_map(coco, records)["overall"]["AP50"]
    return {"tile": tile, "AP50": round(ap50, 1), "recall50": round(found / max(objects, 1), 3), "objects": objects,
            "straddling": cut_objects, "two_boxes": round(cut_two / max(cut_objects, 1), 4),
            "two_boxes_count": cut_two, "pass_s": round(seconds, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a make-shapes folder (default: write one to a temporary folder)")
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--tile", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--time-images", type=int, default=5, help="images timed with plain detect, each way")
    a = p.parse_args(argv)
    from regionclip import RegionCLIP
    from regionclip.data import make_shapes
    from regionclip.evaluate import first_images, load_ground_truth
    from regionclip.tiles import Tiling

    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:
            data = Path(tmp) / "big_shapes"
            make_shapes(data, n_train=0, n_val=a.images, seed=a.seed, image_size=(2048, 2048), captions_per_image=0,
                        object_size=(12, 40), max_objects=60)
        coco = first_images(load_ground_truth(data / "annotations" / "instances_val.json"), a.images)
        ids = sorted(coco.imgs)
        paths = [data / "val" / coco.imgs[i]["file_name"] for i in ids]
        model = RegionCLIP.from_pretrained("demo")
        labels = list(model.cfg.labels)
        print(json.dumps({"data": str(a.data or f"make_shapes seed {a.seed}"), "images": len(ids),
                          "threads": torch.get_num_threads()}), flush=True)
        for tile in (None, a.tile):
            print(json.dumps(evaluate(model.predictor, coco, paths, ids, tile, labels, a.batch_size, Tiling(a.tile))),
                  flush=True)
        times = {None: 0.0, a.tile: 0.0}
        for path in paths[: a.time_images]:
            for tile in times:  # alternating, so load on the machine hits both alike
                start = time.perf_counter()
                model.detect(str(path), labels, tile=tile, batch_size=a.batch_size)
                times[tile] += time.perf_counter() - start
        n = max(1, min(a.time_images, len(paths)))
        print(json.dumps({"seconds_per_image": {"no_tiles": round(times[None] / n, 2), f"tile_{a.tile}": round(times[a.tile] / n, 2)},
                          "ratio": round(times[a.tile] / max(times[None], 1e-9), 1), "images": n}), flush=True)


if __name__ == "__main__":
    main()
