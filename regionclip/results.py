"""COCO results records matched to a ground truth by what both sides share: file and category names.

``regionclip detect`` knows image paths and label strings; a COCO ground truth numbers its
images and categories. This module maps one onto the other, for ``detect --annotations`` (ids
written into the records) and for ``eval --results`` (records that carry ``image``/``label``
instead of, or beside, ids).

Matching rules:
    * an image path matches the ground-truth image whose ``file_name`` is the longest trailing
      part of the path (``/data/coco/val2017/1.jpg`` matches ``val2017/1.jpg`` or ``1.jpg``),
      else the one image with the same base name; several candidates is no match;
    * a label matches the category of exactly that name.

Nothing here imports torch or pycocotools: ``coco`` is anything with pycocotools' ``imgs`` and
``cats`` dicts.
"""

from __future__ import annotations

import json
import os
from pathlib import PurePosixPath
from typing import Any, Mapping, Sequence

from .errors import BadAnnotations


def _parts(path: str | os.PathLike) -> tuple[str, ...]:
    text = os.fspath(path).replace("\\", "/")
    return tuple(p for p in PurePosixPath(text).parts if p not in ("/", "."))


class ImageIndex:
    """Ground-truth image ids by ``file_name``, looked up by image path (see the module rules)."""

    def __init__(self, coco: Any) -> None:
        self._by_parts: dict[tuple[str, ...], list[int]] = {}
        self._by_name: dict[str, list[int]] = {}
        for image_id, img in coco.imgs.items():
            parts = _parts(img["file_name"])
            if parts:
                self._by_parts.setdefault(parts, []).append(image_id)
                self._by_name.setdefault(parts[-1], []).append(image_id)
        self._cache: dict[str, int | None] = {}

    def lookup(self, path: str | os.PathLike) -> int | None:
        """The image id for ``path``, or None when no image, or more than one, matches."""
        key = os.fspath(path)
        if key not in self._cache:
            self._cache[key] = self._lookup(_parts(key))
        return self._cache[key]

    def _lookup(self, parts: tuple[str, ...]) -> int | None:
        for k in range(len(parts), 0, -1):
            ids = self._by_parts.get(parts[-k:])
            if ids:
                return ids[0] if len(ids) == 1 else None
        ids = self._by_name.get(parts[-1]) if parts else None
        return ids[0] if ids and len(ids) == 1 else None


def category_ids_by_name(coco: Any) -> dict[str, int]:
    """``{category name: COCO id}`` of the ground truth."""
    return {c["name"]: c["id"] for c in coco.cats.values()}


def image_ids_for(coco: Any, paths: Sequence[str | os.PathLike]) -> list[int]:
    """The ground-truth image id of each path, in order.

    Raises:
        BadAnnotations: some paths match no ``file_name`` (or several); the message counts
            them and names the first.
    """
    index = ImageIndex(coco)
    ids = [index.lookup(p) for p in paths]
    unmatched = [p for p, i in zip(paths, ids) if i is None]
    if unmatched:
        raise BadAnnotations(
            f"{len(unmatched)} of {len(paths)} images match no file_name of the annotation file "
            f"(first: {os.fspath(unmatched[0])}); pass the images the annotation file lists"
        )
    return ids  # type: ignore[return-value]


def category_ids_for(coco: Any, vocabulary: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """Map vocabulary names to ground-truth category ids.

    Returns:
        ``(ids, missing)``: ``{name: COCO id}`` for the names that are categories of the ground
        truth, and the names that are not (their detections cannot be scored).
    """
    known = category_ids_by_name(coco)
    ids = {n: known[n] for n in vocabulary if n in known}
    return ids, [n for n in vocabulary if n not in known]


def resolve_records(coco: Any, records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Fill in ``image_id``/``category_id`` from ``image``/``label`` where records carry names.

    A record with an ``image`` string takes the id of the matching ground-truth image, and one
    with a ``label`` string the id of the category of that name; names win over ids a record
    also holds, because ``detect`` without ``--annotations`` numbers images by input order and
    labels by vocabulary position, which mean nothing to another file. Records without names
    are copied unchanged; ``check_results`` validates the rest.

    Raises:
        BadAnnotations: a record's image or label matches nothing in the ground truth (the
            message counts such records and names the first).
    """
    if not isinstance(records, (list, tuple)):
        raise BadAnnotations(f"results must be a list of records, but got {type(records).__name__}")
    index, categories = None, category_ids_by_name(coco)
    bad_images, bad_labels = [], []
    out = []
    for rec in records:
        if not isinstance(rec, Mapping):
            out.append(rec)  # check_results names the malformed record
            continue
        rec = dict(rec)
        image, label = rec.get("image"), rec.get("label")
        if isinstance(image, str):
            index = index or ImageIndex(coco)
            image_id = index.lookup(image)
            if image_id is None:
                bad_images.append(image)
            rec["image_id"] = image_id
        if isinstance(label, str):
            if label not in categories:
                bad_labels.append(label)
            rec["category_id"] = categories.get(label)
        out.append(rec)
    if bad_images:
        raise BadAnnotations(
            f"{len(bad_images)} results name images that match no file_name of the annotation file "
            f"(first: {bad_images[0]}); score them against the annotation file the images came from"
        )
    if bad_labels:
        raise BadAnnotations(
            f"{len(bad_labels)} results have labels that are not categories of the annotation file "
            f"(first: {bad_labels[0]!r}); leave those out (Detections.to_records(category_ids=...) or "
            "regionclip detect --annotations write only the file's categories)"
        )
    return out


def dumps_records(records: Sequence[Mapping[str, Any]]) -> str:
    """Records as a JSON list with one record per line: valid JSON, and readable with ``grep``/``head``."""
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, allow_nan=False) for r in records) + "\n]\n"
