"""Write an exemplars-only vocabulary: per category, the first training GT box (deterministic).

    python benchmarks/make_exemplar_vocab.py --annotations data/shapes/annotations/instances_train.json \
        --images data/shapes/train --out /tmp/shapes_exemplars.yaml [--with-text]

"First" is the lowest annotation id of the category (COCO order), so the file is the same on
every run. Image paths are written absolute (the vocabulary file's folder is the root of
relative ones). ``--with-text`` keeps the name as a prompt too (text + exemplar).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def exemplar_vocab(annotations: Path, images: Path, with_text: bool = False) -> dict:
    coco = json.loads(annotations.read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    first: dict[int, dict] = {}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        if ann.get("iscrowd", 0) or ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
            continue
        first.setdefault(ann["category_id"], ann)
    out = {}
    for cat in sorted(coco["categories"], key=lambda c: c["id"]):
        ann = first.get(cat["id"])
        if ann is None:
            continue
        x, y, w, h = ann["bbox"]
        path = (images / files[ann["image_id"]]).resolve()
        entry = {"exemplars": [f"{path}:{x:g},{y:g},{x + w:g},{y + h:g}"]}
        if with_text:
            entry["prompts"] = [cat["name"]]
        out[cat["name"]] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotations", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--with-text", action="store_true", help="keep each name as a prompt (text + exemplar)")
    a = ap.parse_args()
    a.out.write_text(yaml.safe_dump(exemplar_vocab(a.annotations, a.images, a.with_text), sort_keys=False))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
