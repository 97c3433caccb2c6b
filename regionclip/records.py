"""Labelling results in one shape, whatever wrote them: ``Results`` of ``ImageRecord``s.

Two sources today: a ``regionclip detect --json`` file (COCO results records carrying ``image``
and ``label``) and a ``regionclip label`` output folder (Parquet shards + ``manifest.json``).
Every converter (``regionclip.convert``) and the server read this shape, never the files.
Boxes are xyxy in original-image pixels; ``width``/``height`` are the original size (read
from the image header when the source did not record it, None when the file is not there).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput


@dataclass
class ImageRecord:
    """One image's detections. ``image``: the path (or shard key) as the source wrote it."""

    image: str
    width: int | None
    height: int | None
    boxes_xyxy: np.ndarray  # (N, 4) float32, original pixels
    labels: list[str]  # (N,) names
    scores: np.ndarray  # (N,) float32
    error: str | None = None  # why the image has no detections (undecodable), else None
    # How sure the run was (``regionclip.doubt``); None where the source did not record it.
    margins: np.ndarray | None = None  # (N,) score minus the best other column of the box's row
    threshold_gaps: np.ndarray | None = None  # (N,) score minus the class threshold
    near_miss: float | None = None  # the doubt of the closest unclaimed box
    priority: float | None = None  # the image's review priority, in [0, 1]

    def __post_init__(self) -> None:
        self.boxes_xyxy = np.asarray(self.boxes_xyxy, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        if not len(self.boxes_xyxy) == len(self.labels) == len(self.scores):
            raise BadInput(f"{self.image}: {len(self.boxes_xyxy)} boxes, {len(self.labels)} labels and "
                           f"{len(self.scores)} scores; expected one of each per detection")
        for name in ("margins", "threshold_gaps"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, np.float32).reshape(-1)
                if len(value) != len(self.scores):
                    raise BadInput(f"{self.image}: {len(value)} {name} for {len(self.scores)} detections")
                setattr(self, name, value)


@dataclass
class Results:
    """Every image of a run, in the run's order; ``vocabulary`` the label names in id order."""

    images: list[ImageRecord]
    vocabulary: list[str]
    model: str | None = None
    meta: dict = field(default_factory=dict)


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) after EXIF rotation from the header alone; None when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotations that swap the axes
                w, h = h, w
            return int(w), int(h)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


def from_detect_json(path: str | os.PathLike) -> Results:
    """A ``regionclip detect --json`` file (records with ``image``, ``label``, ``bbox`` xywh,
    ``score``). Images appear in first-record order; an image with no detections is absent from
    such a file. The vocabulary is the labels ordered by their ``category_id`` when present."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not a readable detect --json file ({type(exc).__name__})") from None
    if not isinstance(records, list) or any(not isinstance(r, dict) or "bbox" not in r or "image" not in r
                                            for r in records):
        raise BadInput(f"{path}: expected a JSON list of records with 'image' and 'bbox' "
                       "(what `regionclip detect --json` writes)")
    by_image: dict[str, list[dict]] = {}
    ids: dict[str, int] = {}
    for r in records:
        by_image.setdefault(str(r["image"]), []).append(r)
        label = str(r.get("label", r.get("category_id")))
        ids.setdefault(label, int(r.get("category_id", len(ids) + 1)))
    images = []
    for name, recs in by_image.items():
        size = header_size(name) if Path(name).is_file() else None
        xywh = np.asarray([r["bbox"] for r in recs], np.float32).reshape(-1, 4)
        images.append(ImageRecord(
            image=name, width=size[0] if size else None, height=size[1] if size else None,
            boxes_xyxy=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            labels=[str(r.get("label", r.get("category_id"))) for r in recs],
            scores=np.asarray([float(r.get("score", 1.0)) for r in recs], np.float32)))
    return Results(images=images, vocabulary=sorted(ids, key=ids.get), meta={"source": str(path)})


def from_label_dir(path: str | os.PathLike) -> Results:
    """A ``regionclip label --out`` folder (Parquet shards + ``manifest.json``), every image in the
    run's order, undecodable ones with their ``error``."""
    from .label.store import read_label_rows

    manifest, rows = read_label_rows(path)
    # Folders written before the doubt columns read with None there (``doubt`` then ranks by score).
    images = [ImageRecord(image=r["image"], width=r["width"], height=r["height"], boxes_xyxy=r["boxes_xyxy"] or [],
                          labels=list(r["labels"] or []), scores=r["scores"] or [], error=r["error"],
                          margins=r.get("margins"), threshold_gaps=r.get("threshold_gaps"),
                          near_miss=r.get("near_miss"), priority=r.get("priority")) for r in rows]
    model = manifest.get("model")
    return Results(images=images, vocabulary=list(manifest.get("vocabulary") or []),
                   model=model.get("spec") if isinstance(model, dict) else model, meta=manifest)


def load_results(path: str | os.PathLike) -> Results:
    """``Results`` from a ``detect --json`` file or a ``label`` output folder."""
    path = Path(path)
    if path.is_dir():
        return from_label_dir(path)
    if path.is_file():
        return from_detect_json(path)
    raise BadInput(f"{path}: no such file or folder; pass a `regionclip detect --json` file or a "
                   "`regionclip label --out` folder")
