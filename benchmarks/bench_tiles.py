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
  images, alternating image by image in this one process, and their ratio;
- with ``--big``: the peak RSS of a fresh process that detects with tiles in a 10000 x 10000
  (100 MP) JPEG, and without tiles for reference.

    python benchmarks/bench_tiles.py --images 50 --seed 2 --tile 320
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parent.parent

BIG = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from regionclip import RegionCLIP
image, tile = sys.argv[2], (int(sys.argv[3]) or None)
model = RegionCLIP.from_pretrained("demo")
start = time.perf_counter()
dets = model.detect(image, list(model.cfg.labels), tile=tile)
print(json.dumps({"tile": tile, "detect_s": round(time.perf_counter() - start, 1), "boxes": len(dets),
                  "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def big_jpeg(path: Path, side: int = 10000) -> Path:
    """A ``side`` x ``side`` JPEG: a grey field with 30 px shapes on a grid and two large ones."""
    import cv2

    img = np.full((side, side, 3), (110, 120, 100), np.uint8)
    colours = [(220, 35, 35), (35, 170, 50), (35, 70, 220), (240, 215, 35)]
    for k, y in enumerate(range(300, side, 700)):
        for j, x in enumerate(range(300, side, 700)):
            cv2.circle(img, (x, y), 15, colours[(j + k) % 4], -1, cv2.LINE_AA)
    cv2.circle(img, (side // 4, side // 4), side // 10, colours[0], -1)
    cv2.rectangle(img, (side // 2, side // 2), (side // 2 + side // 6, side // 2 + side // 6), colours[2], -1)
    cv2.imwrite(str(path), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


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


def evaluate(predictor, coco, paths, ids, tile, labels, batch_size) -> dict:
    from regionclip.evaluate import coco_map
    from regionclip.tiles import Tiling

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
        windows = Tiling(tile or STRADDLE_TILE, STRADDLE_OVERLAP).windows(h, w)
        across = straddles(gt, windows, (h, w))
        cut_objects += int(across.sum())
        cut_two += int((lying_on(de.boxes_xyxy.float(), gt)[across] >= 2).sum())
    seconds = time.perf_counter() - start
    ap50 = coco_map(coco, records)["overall"]["AP50"]
    return {"tile": tile, "AP50": round(ap50, 1), "recall50": round(found / max(objects, 1), 3), "objects": objects,
            "straddling": cut_objects, "two_boxes": round(cut_two / max(cut_objects, 1), 4),
            "two_boxes_count": cut_two, "pass_s": round(seconds, 1)}


STRADDLE_TILE, STRADDLE_OVERLAP = 320, 0.2  # the grid whose borders count, also for the untiled run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a make-shapes folder (default: write one to a temporary folder)")
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--tile", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--time-images", type=int, default=5, help="images timed with plain detect, each way")
    p.add_argument("--big", action="store_true", help="also the peak RSS of a 100 MP JPEG, with and without tiles")
    a = p.parse_args(argv)
    global STRADDLE_TILE
    STRADDLE_TILE = a.tile
    torch.set_num_threads(torch.get_num_threads())
    from regionclip import RegionCLIP
    from regionclip.data import make_shapes
    from regionclip.evaluate import first_images, load_ground_truth

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
            print(json.dumps(evaluate(model.predictor, coco, paths, ids, tile, labels, a.batch_size)), flush=True)
        times = {None: 0.0, a.tile: 0.0}
        for path in paths[: a.time_images]:
            for tile in times:  # alternating, so load on the machine hits both alike
                start = time.perf_counter()
                model.detect(str(path), labels, tile=tile, batch_size=a.batch_size)
                times[tile] += time.perf_counter() - start
        n = max(1, min(a.time_images, len(paths)))
        print(json.dumps({"seconds_per_image": {"no_tiles": round(times[None] / n, 2), f"tile_{a.tile}": round(times[a.tile] / n, 2)},
                          "ratio": round(times[a.tile] / max(times[None], 1e-9), 1), "images": n}), flush=True)
        if a.big:
            image = big_jpeg(Path(tmp) / "big.jpg")
            for tile in (0, a.tile):
                out = subprocess.run([sys.executable, "-c", BIG, str(ROOT), str(image), str(tile)],
                                     capture_output=True, text=True)
                print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed:\n{out.stderr[-2000:]}",
                      flush=True)


if __name__ == "__main__":
    main()
