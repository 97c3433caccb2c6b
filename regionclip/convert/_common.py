"""What the converters share: score filtering, known image sizes, and file names without clashes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import BadInput, BadOutput
from ..outputs import relative_paths
from ..records import ImageRecord, Results


def kept(record: ImageRecord, min_score: float | None) -> ImageRecord:
    """``record`` with only the detections scoring at least ``min_score`` (all when None)."""
    if min_score is None:
        return record
    keep = record.scores >= float(min_score)
    return replace(record, boxes_xyxy=record.boxes_xyxy[keep], labels=[n for n, k in zip(record.labels, keep) if k],
                   scores=record.scores[keep],
                   margins=None if record.margins is None else record.margins[keep],
                   threshold_gaps=None if record.threshold_gaps is None else record.threshold_gaps[keep])


def usable(results: Results, min_score: float | None) -> list[ImageRecord]:
    """The decoded images of ``results`` (undecodable ones carry no boxes to convert), filtered."""
    if min_score is not None and not 0.0 <= float(min_score) <= 1.0:
        raise BadInput(f"--min-score must be in [0, 1], but got {min_score}")
    return [kept(r, min_score) for r in results.images if r.error is None]


def size_of(record: ImageRecord, fmt: str) -> tuple[int, int]:
    """(width, height) of a record: relative coordinates, clipping and COCO's images need it."""
    if record.width is None or record.height is None:
        raise BadInput(f"{record.image}: image size unknown (the file is not there); {fmt} needs each image's "
                       "width and height: run convert where the detect/label run's image paths resolve")
    return int(record.width), int(record.height)


def names(records: list[ImageRecord]) -> list[str]:
    """Each image's name relative to the images' common folder (``a/x.jpg`` and ``b/x.jpg`` stay apart)."""
    return [p.as_posix() for p in relative_paths([r.image for r in records])[1]]


def vocabulary(results: Results, records: list[ImageRecord]) -> list[str]:
    """The run's vocabulary, plus any label the records use that it lacks (in order of appearance)."""
    vocab = list(dict.fromkeys(results.vocabulary))
    for r in records:
        vocab += [n for n in dict.fromkeys(r.labels) if n not in vocab]
    return vocab


def output_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise BadOutput(f"{out} is a file; this format writes a folder: pass a folder path to --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def clip_xyxy(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes clipped to the image (detector boxes may overhang by a fraction of a pixel)."""
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float64)
