"""Scoring half of ``regionclip eval``: COCO ground truth in, box mAP figures out.

Nothing here runs a model. The caller turns ``Detections`` into COCO results records
(``Detections.to_records(image_id=..., category_ids=...)``) and hands them to ``coco_map``.

Conventions:
    * results records are dicts with ``image_id``, ``category_id`` (COCO ids), ``bbox`` as
      ``[x, y, w, h]`` in original-image pixels, and ``score``; records that carry an ``image``
      file name or a ``label`` get their ids from the ground truth (``regionclip.results``);
    * every figure is in PERCENT, as detectron2 prints it; a figure that is undefined (a category
      or split with no ground truth) is ``None``, never NaN, so reports stay valid JSON;
    * a split is ``{"base": [names], "novel": [names]}`` (``regionclip.data.splits.load_split``).

pycocotools prints as it works; every call into it runs under ``_quiet()`` because the library
never prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .errors import BadAnnotations
from .outputs import atomic_write_json
from .results import resolve_records

_REQUIRED_KEYS = ("images", "annotations", "categories")
_RECORD_KEYS = ("image_id", "category_id", "bbox", "score")
_SPLIT_NAMES = ("base", "novel")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def load_ground_truth(path: str | os.PathLike) -> COCO:
    """Read a COCO instances file into a pycocotools ``COCO`` index.

    Annotations without ``area`` get ``w * h`` and without ``iscrowd`` get 0, because COCOeval
    needs both and box-only datasets often leave them out.

    Raises:
        BadAnnotations: the file is missing, is not JSON, or is not COCO instances.
    """
    path = Path(path)
    if not path.is_file():
        raise BadAnnotations(f"annotation file {path} does not exist: pass a COCO instances JSON")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadAnnotations(f"{path} is not JSON ({str(exc).splitlines()[0]})") from None
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise BadAnnotations(
            f"{path} is not a COCO annotation file: missing {', '.join(map(repr, missing))}"
            " (a COCO instances JSON has 'images', 'annotations' and 'categories')"
        )
    try:
        for ann in data["annotations"]:
            ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
            ann.setdefault("iscrowd", 0)
        coco = COCO()
        coco.dataset = data
        with _quiet():
            coco.createIndex()
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise BadAnnotations(
            f"{path} is not a COCO annotation file: an entry lacks or mangles {exc}"
        ) from None
    return coco


def first_images(coco: COCO, n: int | None) -> COCO:
    """``coco`` restricted to its ``n`` lowest image ids and their annotations (all of it when
    ``n`` is None or covers every image). The same subset whoever asks: every DDP rank and every
    evaluation of a run score the same images."""
    if n is None or n >= len(coco.imgs):
        return coco
    keep = set(sorted(coco.imgs)[: max(int(n), 1)])
    data = dict(coco.dataset)
    data["images"] = [im for im in coco.dataset["images"] if im["id"] in keep]
    data["annotations"] = [a for a in coco.dataset["annotations"] if a["image_id"] in keep]
    subset = COCO()
    subset.dataset = data
    with _quiet():
        subset.createIndex()
    return subset


def check_results(coco_gt: COCO, records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Validate COCO results records against the ground truth; return clean copies.

    Records with an ``image`` file name or a ``label`` first get ``image_id``/``category_id``
    from the ground truth (``regionclip.results.resolve_records``: names win over ids), so
    ``regionclip detect --json`` output scores as it is. Each copy holds exactly ``image_id``
    (int), ``category_id`` (int), ``bbox`` (4 floats, ``[x, y, w, h]``) and ``score`` (float);
    extra keys such as ``label`` are dropped. An empty list is valid.

    Raises:
        BadAnnotations: a record is malformed, names an image or label the ground truth does
            not have, or names image or category ids it does not have (the message names the
            first and counts them).
    """
    records = resolve_records(coco_gt, records)
    clean = []
    for i, rec in enumerate(records):
        try:
            bbox = [float(v) for v in rec["bbox"]]
            out = {
                "image_id": int(rec["image_id"]),
                "category_id": int(rec["category_id"]),
                "bbox": bbox,
                "score": float(rec["score"]),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise BadAnnotations(
                f"results record {i} is malformed ({exc!r}); each needs "
                f"{', '.join(_RECORD_KEYS)} with bbox as [x, y, w, h] (an 'image' file name may stand in "
                "for image_id, a 'label' for category_id)"
            ) from None
        if len(bbox) != 4 or not all(map(math.isfinite, bbox + [out["score"]])):
            raise BadAnnotations(
                f"results record {i} has bbox {rec['bbox']} / score {rec['score']}: "
                "bbox must be 4 finite numbers [x, y, w, h] and score finite"
            )
        clean.append(out)
    _check_known(clean, "image_id", set(coco_gt.getImgIds()), "image",
                 "evaluate against the annotation file the images came from")
    _check_known(clean, "category_id", set(coco_gt.getCatIds()), "category",
                 "map labels to COCO ids (Detections.to_records(category_ids=...))")
    return clean


def _check_known(records: list[dict], key: str, known: set[int], what: str, remedy: str) -> None:
    unknown = [r[key] for r in records if r[key] not in known]
    if unknown:
        raise BadAnnotations(
            f"{len(unknown)} results name {what} ids not in the ground truth "
            f"(first: {unknown[0]}); {remedy}"
        )


def check_split(
    coco_gt: COCO,
    split: Mapping[str, Sequence[str]],
    vocabulary: Sequence[str] | None = None,
) -> dict[str, list[int]]:
    """Check a split before any model runs: its names against the ground truth and the vocabulary.

    Call it right after loading the ground truth, so a wrong split fails in a second instead
    of after inference. ``vocabulary`` is the label list detection will use (None: the ground
    truth's category names); it must contain at least one split category, or every split
    figure would be zero. A vocabulary holding only some of the split is allowed (e.g. novel
    names alone).

    Returns:
        ``split_category_ids(coco_gt, split)``.

    Raises:
        BadAnnotations: from ``split_category_ids``, or no split category is in the vocabulary.
    """
    ids = split_category_ids(coco_gt, split)
    if vocabulary is not None:
        names = set(vocabulary)
        if not any(n in names for part in _SPLIT_NAMES for n in split[part]):
            raise BadAnnotations(
                "none of the split's categories is in the vocabulary, so every split figure would be 0; "
                f"the vocabulary starts {list(vocabulary)[:3]}, the split's base list {list(split['base'])[:3]}"
            )
    return ids


def split_category_ids(coco_gt: COCO, split: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Map a ``{"base": [names], "novel": [names]}`` split to COCO category ids, in split order.

    Raises:
        BadAnnotations: a part is missing, a name is in both parts, or a name is not a
            category of the ground truth.
    """
    by_name = {c["name"]: c["id"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    for part in _SPLIT_NAMES:
        if part not in split:
            raise BadAnnotations(f"the split has no {part!r} list; a split names 'base' and 'novel'")
    both = sorted(set(split["base"]) & set(split["novel"]))
    if both:
        raise BadAnnotations(f"the split names {both} as both base and novel; keep each in one")
    unknown = [n for part in _SPLIT_NAMES for n in split[part] if n not in by_name]
    if unknown:
        raise BadAnnotations(
            f"the split names {len(unknown)} categories not in the ground truth "
            f"(first: {unknown[0]!r}); use the annotation file's category names"
        )
    return {part: [by_name[n] for n in split[part]] for part in _SPLIT_NAMES}


def _load_results(coco_gt: COCO, records: list[dict]) -> COCO:
    if records:
        with _quiet():
            return coco_gt.loadRes([dict(r) for r in records])  # loadRes writes into its input
    # loadRes indexes records[0]; an empty result set is an index with no annotations.
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with _quiet():
        coco_dt.createIndex()
    return coco_dt


def _percent(values: np.ndarray) -> float | None:
    """Mean of the defined (> -1) precision/recall entries, in percent; None when none is."""
    values = values[values > -1]
    return float(values.mean() * 100) if values.size else None


def _summary(precision: np.ndarray, params: Any, cat_index: Sequence[int]) -> dict[str, float | None]:
    """COCOeval.summarize's six AP figures over the categories at ``cat_index``.

    ``precision`` is ``eval['precision']``, shape (T iou thresholds, R recall thresholds,
    K categories, A area ranges, M max-dets). COCOeval scores each category on its own, so
    slicing K equals re-running with ``params.catIds`` restricted, at a third of the cost.
    """
    p = precision[:, :, list(cat_index)]
    area = {label: i for i, label in enumerate(params.areaRngLbl)}
    m = list(params.maxDets).index(100)
    t50 = int(np.argmin(np.abs(params.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(params.iouThrs - 0.75)))
    return {
        "AP": _percent(p[:, :, :, area["all"], m]),
        "AP50": _percent(p[t50, :, :, area["all"], m]),
        "AP75": _percent(p[t75, :, :, area["all"], m]),
        "APs": _percent(p[:, :, :, area["small"], m]),
        "APm": _percent(p[:, :, :, area["medium"], m]),
        "APl": _percent(p[:, :, :, area["large"], m]),
    }


def coco_map(
    coco_gt: COCO,
    records: Sequence[Mapping[str, Any]],
    split: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Box mAP of results records against the ground truth, in percent.

    With a split this is the generalized open-vocabulary setting: detections come from the
    whole vocabulary, and ``base``/``novel`` average only over their own categories.

    Returns:
        ``{"overall": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "base": {...},
        "novel": {...}, "per_category": {name: AP}}``; ``base``/``novel`` only with a split.
        Figures with no ground truth behind them are ``None``.

    Raises:
        BadAnnotations: from ``check_results`` or ``split_category_ids``.
    """
    clean = check_results(coco_gt, records)
    parts = split_category_ids(coco_gt, split) if split is not None else {}
    coco_eval = COCOeval(coco_gt, _load_results(coco_gt, clean), iouType="bbox")
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
    params, precision = coco_eval.params, coco_eval.eval["precision"]
    index = {cat_id: k for k, cat_id in enumerate(params.catIds)}
    report: dict[str, Any] = {"overall": _summary(precision, params, range(len(params.catIds)))}
    for part, cat_ids in parts.items():
        report[part] = _summary(precision, params, [index[c] for c in cat_ids])
    m = list(params.maxDets).index(100)
    report["per_category"] = {
        coco_gt.cats[cat_id]["name"]: _percent(precision[:, :, k, 0, m])  # area 0 is "all"
        for cat_id, k in index.items()
    }
    return report


def coco_ap50(coco_gt: COCO, records: Sequence[Mapping[str, Any]], cat_ids: Sequence[int]) -> float | None:
    """COCO AP at IoU 0.5 (percent, 100 detections per image) over the categories ``cat_ids``
    only; None when they have no ground truth (or none is given)."""
    if not cat_ids:
        return None
    coco_eval = COCOeval(coco_gt, _load_results(coco_gt, check_results(coco_gt, records)), iouType="bbox")
    coco_eval.params.catIds = list(cat_ids)
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
    return _summary(coco_eval.eval["precision"], coco_eval.params, range(len(cat_ids)))["AP50"]


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON, atomically (``regionclip.outputs.atomic_write_json``).

    Parent folders are created; NaN becomes ``null``; the file gets the umask's usual
    permissions (0644), not a temporary file's 0600. Returns the path written.

    Raises:
        BadOutput: the path cannot be written.
    """
    return atomic_write_json(path, report, indent=2)
