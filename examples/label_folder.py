"""Label every image in a folder from Python: COCO JSON plus an annotated copy of each image.

Shows ``RegionCLIP.detect`` on a list of images (one call, batched inside), ``Detections.to_records``
for COCO records, and ``regionclip.visualize.save_annotated`` for the pictures. The JSON is a COCO
instances file (``images``, ``annotations`` with a ``score``, ``categories``), so the labelled
folder can be looked at, scored with ``regionclip eval --annotations``, or trained on
(see ``examples/finetune_custom.py``).

Run (offline, demo model; 8 s of CPU time, 6 of them importing torch):

    python examples/label_folder.py                              # draws 6 shapes images to label first
    python examples/label_folder.py photos/ --out labelled/ --labels "red circle,blue square"
    python examples/label_folder.py photos/ --model rn50 --labels "dog,cat"   # any preset or YAML

Writes ``OUT/annotations.json`` and ``OUT/annotated/<name>`` (same extension as the input when it
is a common one, else ``.png``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from regionclip import RegionCLIP
from regionclip.data.shapes import CATEGORIES, render_shapes_image
from regionclip.errors import BadImage
from regionclip.io import expand_inputs, load_image
from regionclip.visualize import save_annotated

KEEP_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def draw_sample_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """Stand-in for your photos: ``count`` generated shapes images (PNG) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, _ = render_shapes_image(np.random.default_rng([seed, i]), size=(288, 384), empty_prob=0.0)
        Image.fromarray(image).save(folder / f"shapes_{i:03d}.png")
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, help="folder of images (default: draw sample images into OUT/images)")
    parser.add_argument("--out", type=Path, default=Path("labelled"), help="output folder (default: %(default)s)")
    parser.add_argument("--labels", default=",".join(CATEGORIES), help="comma-separated vocabulary (default: the 12 shapes names)")
    parser.add_argument("--model", default="demo", help="preset name or preset YAML (default: %(default)s)")
    parser.add_argument("--score-threshold", type=float, default=None, help="drop detections below this (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--num-images", type=int, default=6, help="sample images to draw when no folder is given (default: %(default)s)")
    args = parser.parse_args(argv)

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    folder = args.folder if args.folder is not None else draw_sample_folder(args.out / "images", args.num_images)
    paths, problems = expand_inputs([folder])
    for problem in problems:
        print(f"skipped: {problem}")

    # Load first, so one unreadable file is skipped instead of failing the whole batch.
    images, names = [], []
    for path in paths:
        try:
            images.append(load_image(path))
            names.append(path.name)
        except BadImage as exc:
            print(f"skipped: {exc}")
    if not images:
        raise SystemExit(f"no readable images in {folder}")

    model = RegionCLIP.from_pretrained(args.model)
    start = time.perf_counter()
    all_dets = model.detect(images, labels, score_threshold=args.score_threshold, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    category_ids = {name: k + 1 for k, name in enumerate(labels)}  # COCO ids start at 1
    coco: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": name} for name, i in category_ids.items()],
    }
    for image_id, (name, image, dets) in enumerate(zip(names, images, all_dets), start=1):
        dets = dets.cpu()
        h, w = image.shape[:2]
        coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        for record in dets.to_records(image_id=image_id, category_ids=category_ids):
            x, y, bw, bh = record["bbox"]
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": record["category_id"],
                "bbox": [x, y, bw, bh], "area": round(bw * bh, 2), "iscrowd": 0, "score": record["score"],
            })
        suffix = Path(name).suffix if Path(name).suffix.lower() in KEEP_EXTENSIONS else ".png"
        save_annotated(args.out / "annotated" / (Path(name).stem + suffix), image, dets)
        print(f"{name}: " + (", ".join(f"{n} {s:.2f}" for n, s in zip(dets.names, dets.scores.tolist())) or "nothing"))

    json_path = args.out / "annotations.json"
    json_path.write_text(json.dumps(coco, indent=1) + "\n")
    print(f"{len(images)} images, {len(coco['annotations'])} boxes in {seconds:.1f} s -> {json_path}, {args.out / 'annotated'}/")
    return {"json": json_path, "annotated": args.out / "annotated", "images": len(images), "boxes": len(coco["annotations"])}


if __name__ == "__main__":
    main()
