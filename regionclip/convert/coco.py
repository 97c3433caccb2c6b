"""``--to coco``: COCO results records (what ``regionclip eval --results`` scores), or with
``instances=True`` a COCO instances file (images with sizes, categories, annotations) to train on.

``instances_file`` is the one COCO instances writer: ``--to cvat`` zips what it returns. Its rules:
image ids from 1 (the decoded images, in the results' order); category ids from 1, the run's
vocabulary in order, then any label the records use that it lacks (``_common.vocabulary``, as
every converter maps them); boxes clipped to the image; ``file_name`` relative to the images'
common folder, written as ``info.images_dir`` (the ``images_dir`` to train with; CVAT names a
task's files uploaded from there the same way). Each annotation keeps its ``score`` beside the
COCO fields (pycocotools and CVAT ignore what they do not know), except people's boxes read back
from a tool (``Results.annotated``), which are written as an instances file whatever was asked.

Results records keep ``detect --json``'s numbering: ``image_id`` the image's 0-based position in
the results, ``category_id`` as in ``instances_file``. They also carry ``image`` and ``label``, so
``eval --results`` matches them to any ground truth by file name and category name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..outputs import atomic_write_json, check_output_file, relative_paths
from ..records import ImageRecord, Results
from ..results import dumps_records
from ._common import clip_xyxy, kept, size_of, usable, vocabulary


def _boxes_xywh(record: ImageRecord) -> np.ndarray:
    """The record's boxes as xywh, clipped to the image when its size is known, 3 decimals."""
    xyxy = np.asarray(record.boxes_xyxy, np.float64).reshape(-1, 4)
    if record.width is not None and record.height is not None:
        xyxy = clip_xyxy(xyxy, int(record.width), int(record.height))
    return np.round(np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1), 3)


def results_records(results: Results, min_score: float | None = None) -> list[dict]:
    """COCO results records (``bbox`` xywh in original pixels) with ``image`` and ``label``."""
    ids = category_ids(results, usable(results, min_score))
    out = []
    for image_id, rec in enumerate(results.images):
        rec = kept(rec, min_score)
        for box, label, score in zip(_boxes_xywh(rec).tolist(), rec.labels, np.asarray(rec.scores).tolist()):
            out.append({"image_id": image_id, "category_id": ids[label], "bbox": box, "score": round(float(score), 5),
                        "image": rec.image, "label": str(label)})
    return out


def category_ids(results: Results, records: list[ImageRecord]) -> dict[str, int]:
    """Label -> COCO category id: from 1, the vocabulary then the labels it lacks (``_common.vocabulary``)."""
    return {name: i + 1 for i, name in enumerate(vocabulary(results, records))}


def instances_file(results: Results, min_score: float | None = None, fmt: str = "coco") -> dict:
    """The COCO instances dict of ``results`` (rules above): every decoded image (those without
    detections are negatives), one annotation per detection scoring at least ``min_score``.
    ``fmt`` names the format in the error for an image without a recorded size."""
    records = usable(results, min_score)
    ids = category_ids(results, records)
    root, names = relative_paths([r.image for r in records])
    what = f"corrections from {results.meta.get('format')}" if results.annotated else "regionclip detections"
    coco = {"info": {"description": what, "images_dir": str(root), "model": results.model},
            "licenses": [], "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in ids.items()],
            "images": [], "annotations": []}
    for image_id, (r, name) in enumerate(zip(records, names), start=1):
        w, h = size_of(r, fmt)
        coco["images"].append({"id": image_id, "file_name": name.as_posix(), "width": w, "height": h})
        for (x, y, bw, bh), label, score in zip(_boxes_xywh(r).tolist(), r.labels, np.asarray(r.scores).tolist()):
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": ids[label],
                "bbox": [x, y, bw, bh], "area": round(bw * bh, 3), "iscrowd": 0, "segmentation": [],
                **({} if results.annotated else {"score": round(float(score), 5)})})
    return coco


def write(results: Results, out: Path, instances: bool = False, min_score: float | None = None, **_) -> Path:
    """Write ``results`` to ``out`` (a .json file): results records, or an instances file."""
    usable(results, min_score)  # min_score checked before anything is written
    check_output_file(out, "--out")
    if instances or results.annotated:  # people's boxes are ground truth: results records would mean nothing
        return atomic_write_json(out, instances_file(results, min_score))
    return atomic_write_text(out, dumps_records(results_records(results, min_score)))
