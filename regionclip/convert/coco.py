"""``--to coco``: COCO results records (what ``regionclip eval --results`` scores), or with
``instances=True`` a COCO instances file (images with sizes, categories, annotations) to train on.

Ids: an image's id is its 0-based position in the results, a label's category id its 1-based
position in the vocabulary (as ``regionclip detect --json`` numbers them). Results records also
carry ``image`` and ``label``, so ``eval --results`` matches them to any ground truth by file
name and category name. In an instances file, ``file_name`` is relative to the images' common
folder, written as ``info.images_dir``: the ``images_dir`` to train with.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import BadInput
from ..outputs import atomic_write_json, check_output_file
from ..records import Results
from ..results import dumps_records


def _xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], axis=1)


def _kept(record, min_score: float | None) -> np.ndarray:
    return np.ones(len(record.scores), bool) if min_score is None else record.scores >= min_score


def results_records(results: Results, min_score: float | None = None) -> list[dict]:
    """COCO results records (``bbox`` xywh in original pixels) with ``image`` and ``label``."""
    ids = {name: i + 1 for i, name in enumerate(results.vocabulary)}
    records = []
    for image_id, rec in enumerate(results.images):
        keep = _kept(rec, min_score)
        for box, label, score in zip(_xywh(rec.boxes_xyxy)[keep], np.asarray(rec.labels, object)[keep],
                                     rec.scores[keep]):
            records.append({"image_id": image_id, "category_id": ids.get(label, 0),
                            "bbox": [round(float(v), 3) for v in box], "score": round(float(score), 5),
                            "image": rec.image, "label": str(label)})
    return records


def instances_file(results: Results, min_score: float | None = None) -> dict:
    """A COCO instances dict of ``results``: every decoded image (those without detections are
    negatives), the vocabulary as categories, one annotation per detection (``score`` kept)."""
    decoded = [(i, r) for i, r in enumerate(results.images) if r.error is None]
    unsized = [r.image for _, r in decoded if r.width is None or r.height is None]
    if unsized:
        raise BadInput(f"{len(unsized)} image(s) have no recorded size (first: {unsized[0]}); an instances file "
                       "needs width and height: convert a regionclip label folder, or keep the images beside "
                       "the detect --json file")
    paths = [r.image for _, r in decoded]
    root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])) if paths else Path(".")
    ids = {name: i + 1 for i, name in enumerate(results.vocabulary)}
    images, annotations = [], []
    for image_id, rec in decoded:
        images.append({"id": image_id, "file_name": os.path.relpath(os.path.abspath(rec.image), root),
                       "width": int(rec.width), "height": int(rec.height)})
        keep = _kept(rec, min_score)
        for box, label, score in zip(_xywh(rec.boxes_xyxy)[keep], np.asarray(rec.labels, object)[keep],
                                     rec.scores[keep]):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[label],
                                "bbox": [round(float(v), 3) for v in box], "area": round(float(box[2] * box[3]), 3),
                                "iscrowd": 0, "score": round(float(score), 5)})
    return {"info": {"description": "pseudo-labels written by regionclip convert", "images_dir": str(root),
                     "model": results.model},
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in ids.items()]}


def write(results: Results, out: Path, instances: bool = False, min_score: float | None = None) -> Path:
    """Write ``results`` to ``out`` (a .json file): results records, or an instances file."""
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise BadInput(f"--min-score must be in [0, 1], but got {min_score}")
    check_output_file(out, "--out")
    if instances:
        missing = sorted({lab for r in results.images for lab in r.labels} - set(results.vocabulary))
        if missing:
            raise BadInput(f"label {missing[0]!r} is not in the results' vocabulary; an instances file needs "
                           "every label as a category")
        return atomic_write_json(out, instances_file(results, min_score))
    return atomic_write_text(out, dumps_records(results_records(results, min_score)))
