"""Short-list evaluation: what ``detect --labels "dog,cat,bicycle"`` does to everything else.

COCO mAP scores a model over the data set's whole vocabulary, so it never shows what a user's
first command shows: a list of a few names, on images full of other things. This protocol draws
seeded random K-name lists from the vocabulary and detects each with only its names, at the
model's own scoring (its score threshold, NMS and ``max_detections``, one label per box), then
reports per list and in the mean:

- ``precision`` / ``recall`` of the listed names (a detection is right when it overlaps an
  unmatched ground-truth object of its name at IoU >= 0.5, best score first);
- ``foreign``: the share of ground-truth objects whose class is *not* on the list that get a box
  with a listed name at IoU >= 0.5 (the foreign-label rate);
- ``AP50`` of the listed classes (a second selection at threshold 0, no agnostic NMS, 100 per
  image, as ``eval`` ranks);
- the same four for the full vocabulary's run filtered to the list (``reference``: the model
  when it knows every name);
- ``score_change``: per listed-name detection that the full run also gives (same box and name),
  the absolute change of its score; the median over all lists.

Proposals and region embeddings are computed once per image for every list
(``Predictor.stream_runs``), so N lists cost about one evaluation, not N.
"""

from __future__ import annotations

import random
import statistics
from typing import Callable, Sequence

import torch
from torchvision.ops import box_iou

from .errors import BadInput

MATCH_IOU = 0.5
SAME_BOX_IOU = 0.99  # "the same detection" in two runs: one proposal, so the same box up to rounding
AP_MAX_DETECTIONS = 100


def pick_lists(names: Sequence[str], size: int, count: int, seed: int = 0) -> list[list[str]]:
    """``count`` seeded random lists of ``size`` distinct names (each list in vocabulary order)."""
    names = list(dict.fromkeys(names))
    if not 1 <= size < len(names):
        raise BadInput(f"a short list holds 1 to {len(names) - 1} of the {len(names)} names, but got {size}")
    if count < 1:
        raise BadInput(f"the number of short lists must be at least 1, but got {count}")
    rng = random.Random(seed)
    order = {n: i for i, n in enumerate(names)}
    return [sorted(rng.sample(names, size), key=order.__getitem__) for _ in range(count)]


class _Tally:
    """Counts for one list under one run."""

    def __init__(self) -> None:
        self.right = self.found = self.listed_gt = self.foreign_hit = self.foreign_gt = 0
        self.records: list[dict] = []

    def add(self, dets, gt_boxes: torch.Tensor, gt_names: list[str], listed: set[str]) -> None:
        """``dets`` (``Detections`` with listed names only, original pixels) against one image's ground truth."""
        iou = box_iou(dets.boxes_xyxy.float(), gt_boxes) if len(dets) and len(gt_boxes) else \
            torch.zeros(len(dets), len(gt_boxes))
        used: set[int] = set()
        names = dets.names
        for j in torch.argsort(dets.scores, descending=True).tolist():
            self.found += 1
            for k in torch.argsort(iou[j], descending=True).tolist():
                if iou[j, k] < MATCH_IOU:
                    break
                if k not in used and gt_names[k] == names[j]:
                    used.add(k)
                    self.right += 1
                    break
        for k, name in enumerate(gt_names):
            if name in listed:
                self.listed_gt += 1
            else:
                self.foreign_gt += 1
                self.foreign_hit += int(len(dets) > 0 and bool(iou[:, k].max() >= MATCH_IOU))

    def figures(self) -> dict:
        return {"precision": _ratio(self.right, self.found), "recall": _ratio(self.right, self.listed_gt),
                "foreign": _ratio(self.foreign_hit, self.foreign_gt), "detections": self.found,
                "listed_objects": self.listed_gt, "unlisted_objects": self.foreign_gt}


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _only(dets, names: set[str]):
    return dets[torch.tensor([n in names for n in dets.names], dtype=torch.bool)] if len(dets) else dets


def _score_changes(short, full, listed: set[str]) -> list[float]:
    """|score change| of each listed-name detection of ``short`` that ``full`` gives too (same name, same box)."""
    full = _only(full, listed)
    if not len(short) or not len(full):
        return []
    iou = box_iou(short.boxes_xyxy.float(), full.boxes_xyxy.float())
    out = []
    for j, name in enumerate(short.names):
        same = [k for k in torch.nonzero(iou[j] >= SAME_BOX_IOU).flatten().tolist() if full.names[k] == name]
        if same:
            out.append(abs(float(short.scores[j]) - float(full.scores[same[0]])))
    return out


def evaluate_short_lists(predictor, coco, paths: Sequence, image_ids: Sequence[int], vocabulary: Sequence[str],
                         lists: Sequence[Sequence[str]], *, distractors=None, batch_size: int = 8, workers: int = 0,
                         tiling: dict | None = None,
                         progress: Callable[[int], None] | None = None) -> dict:
    """The short-list report for ``lists`` (each a list of names from ``vocabulary``) over the images
    ``paths`` (ground truth ``image_ids`` of ``coco``, a pycocotools COCO). ``distractors`` as
    ``Predictor.stream`` takes them (None: the model's own). Ground-truth objects are matched by
    category name, so a vocabulary may hold names the file does not (a model's names on another
    world: every object is then unlisted). Returns ``{"lists": [...], "mean": {...}, "reference_mean":
    {...}, "score_change_median", "settings"}``. ``tiling``: ``{"tile", "tile_overlap"}`` as
    ``Predictor.stream_runs`` takes them."""
    from .evaluate import coco_ap50

    vocabulary = list(dict.fromkeys(vocabulary))
    cfg = predictor.scoring_config()
    shown = {"top_k": 1}  # one label per box: what a short list's user reads
    ranked = {"top_k": 1, "score_threshold": 0.0, "agnostic_nms": False, "max_detections": AP_MAX_DETECTIONS}
    runs = [dict(labels=vocabulary, distractors=distractors, **shown),
            dict(labels=vocabulary, distractors=distractors, **ranked)]
    for names in lists:
        runs += [dict(labels=list(names), distractors=distractors, **shown),
                 dict(labels=list(names), distractors=distractors, **ranked)]
    cats = {c["name"]: c["id"] for c in coco.cats.values()}
    listed = [set(names) for names in lists]
    shown_t = [_Tally() for _ in lists]
    ref_t = [_Tally() for _ in lists]
    changes: list[float] = []
    images = 0
    for p in predictor.stream_runs(paths, runs, batch_size=batch_size, num_workers=workers, **(tiling or {})):
        if progress:
            progress(1)
        if p.error is not None:
            continue
        images += 1
        image_id = image_ids[p.index]
        anns = coco.imgToAnns.get(image_id, [])
        gt_boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                 for a in anns], dtype=torch.float32).reshape(-1, 4)
        gt_names = [coco.cats[a["category_id"]]["name"] for a in anns]
        full_shown, full_ranked = (d.cpu() for d in p.runs[:2])
        for i, names in enumerate(listed):
            short_shown, short_ranked = (d.cpu() for d in p.runs[2 + 2 * i: 4 + 2 * i])
            shown_t[i].add(short_shown, gt_boxes, gt_names, names)
            ref_t[i].add(_only(full_shown, names), gt_boxes, gt_names, names)
            known = {n: cats[n] for n in names if n in cats}
            shown_t[i].records += _only(short_ranked, set(known)).to_records(image_id=image_id, category_ids=known)
            ref_t[i].records += _only(full_ranked, set(known)).to_records(image_id=image_id, category_ids=known)
            changes += _score_changes(short_shown, full_shown, names)
    if images == 0:
        raise BadInput("no image could be read for the short-list evaluation")
    rows = []
    for names, mine, ref in zip(lists, shown_t, ref_t):
        ids = [cats[n] for n in names if n in cats]
        rows.append({"labels": list(names),
                     **mine.figures(), "AP50": coco_ap50(coco, mine.records, ids),
                     "reference": {**ref.figures(), "AP50": coco_ap50(coco, ref.records, ids)}})
    return {
        "lists": rows,
        "mean": _mean(rows),
        "reference_mean": _mean([r["reference"] for r in rows]),
        "score_change_median": round(statistics.median(changes), 4) if changes else None,
        "score_changes": len(changes),
        "settings": {"lists": len(lists), "size": len(lists[0]) if lists else 0, "vocabulary": vocabulary,
                     "distractors": distractors if distractors is not None else "default",
                     "score_threshold": cfg.score_threshold, "images": images, "match_iou": MATCH_IOU},
    }


def _mean(rows: list[dict]) -> dict:
    out = {}
    for key in ("precision", "recall", "foreign", "AP50"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = round(sum(values) / len(values), 4) if values else None
    return out
