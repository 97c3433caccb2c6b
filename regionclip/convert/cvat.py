"""CVAT: a COCO 1.0 archive (``annotations/instances_default.json`` in a zip), what CVAT's
"Upload annotations" with format "COCO 1.0" reads into a task whose images are those of the run.

Images are named relative to their common folder, as CVAT names a task's files uploaded from
there; categories are the run's vocabulary (ids from 1). Each annotation keeps its ``score``
beside the COCO fields (pycocotools and CVAT ignore what they do not know).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..atomic import atomic_path
from ..errors import BadOutput
from ..records import Results
from ._common import clip_xyxy, names, size_of, usable, vocabulary

MEMBER = "annotations/instances_default.json"


def instances(results: Results, min_score: float | None = None) -> dict:
    """The COCO instances dict (``images``, ``categories``, ``annotations`` with xywh ``bbox``)."""
    records = usable(results, min_score)
    vocab = vocabulary(results, records)
    ids = {name: i + 1 for i, name in enumerate(vocab)}
    coco = {"info": {"description": "regionclip detections"}, "licenses": [],
            "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in ids.items()],
            "images": [], "annotations": []}
    for image_id, (r, name) in enumerate(zip(records, names(records)), start=1):
        w, h = size_of(r, "cvat")
        coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        for (x1, y1, x2, y2), label, score in zip(clip_xyxy(r.boxes_xyxy, w, h), r.labels, r.scores.tolist()):
            bw, bh = x2 - x1, y2 - y1
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": ids[label],
                "bbox": [x1, y1, bw, bh], "area": bw * bh, "iscrowd": 0, "segmentation": [],
                "attributes": {"occluded": False}, "score": score})
    return coco


def write(results: Results, out: Path, *, min_score: float | None = None, **_) -> Path:
    """Write the archive at ``out`` (a ``.zip`` file); returns ``out``."""
    out = Path(out)
    if out.is_dir():
        raise BadOutput(f"{out} is a folder; cvat writes one archive: pass a file such as {out / 'cvat.zip'}")
    data = json.dumps(instances(results, min_score))
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MEMBER, data)
    return out
