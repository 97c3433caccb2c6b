"""The GT-box protocol: classify every ground-truth box over the vocabulary, then score it.

This isolates recognition from localisation (RegionCLIP's "GT boxes as proposals" table). The
caller takes each image's boxes from ``gt_boxes``, scores them with any model and passes the score
matrices back; nothing here knows about models, so every figure can be checked by hand.

Inputs shared by the functions below, all keyed by COCO image id:
    * ``box_scores[image_id]``: (G, C) tensor or array, row ``g`` scores the box
      ``ann_ids[image_id][g]`` against column ``c``, the category ``category_ids[c]`` (COCO ids);
      higher is better (logits or probabilities; only the order matters for accuracy);
    * ``ann_ids[image_id]``: the G annotation ids, in row order (as ``gt_boxes`` returns them).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO

from .errors import BadAnnotations, BadInput
from .evaluate import split_category_ids

ScoreMatrix = torch.Tensor | np.ndarray


def gt_boxes(
    coco_gt: COCO, image_id: int, include_crowd: bool = False
) -> tuple[list[int], torch.Tensor]:
    """The ground-truth boxes of one image: (annotation ids, (G, 4) float ``boxes_xyxy``).

    Boxes are in original-image pixels. Crowd regions are left out by default because they
    mark a group, not one object to name.
    """
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
    anns = [a for a in anns if include_crowd or not a.get("iscrowd", 0)]
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    return [a["id"] for a in anns], torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)


def _gather(
    coco_gt: COCO,
    box_scores: Mapping[int, ScoreMatrix],
    ann_ids: Mapping[int, Sequence[int]],
    category_ids: Sequence[int],
) -> tuple[list[dict], torch.Tensor]:
    """Check the inputs line up; return the annotations and their stacked (N, C) scores."""
    if set(box_scores) != set(ann_ids):
        odd = sorted(set(box_scores) ^ set(ann_ids))
        raise BadInput(f"box_scores and ann_ids must have the same image ids; {odd[:5]} differ")
    missing = sorted(set(coco_gt.getCatIds()) - set(category_ids))
    if missing:
        raise BadInput(
            f"category_ids lacks {len(missing)} ground-truth categories (first: {missing[0]}); "
            "the protocol classifies over every category of the annotation file"
        )
    anns, rows = [], []
    for image_id, ids in ann_ids.items():
        scores = torch.as_tensor(box_scores[image_id], dtype=torch.float32).cpu()
        if scores.shape != (len(ids), len(category_ids)):
            raise BadInput(
                f"box_scores[{image_id}] must have shape ({len(ids)}, {len(category_ids)}) "
                f"(boxes, categories), but got {tuple(scores.shape)}"
            )
        for ann_id in ids:
            ann = coco_gt.anns.get(ann_id)
            if ann is None or ann["image_id"] != image_id:
                raise BadAnnotations(
                    f"annotation {ann_id} is not a box of image {image_id} in the ground truth; "
                    "take the ids from gt_boxes(coco_gt, image_id)"
                )
            anns.append(ann)
        rows.append(scores)
    stacked = torch.cat(rows) if rows else torch.zeros((0, len(category_ids)))
    return anns, stacked


def gt_box_accuracy(
    coco_gt: COCO,
    box_scores: Mapping[int, ScoreMatrix],
    ann_ids: Mapping[int, Sequence[int]],
    category_ids: Sequence[int],
    split: Mapping[str, Sequence[str]] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, dict[str, Any]]:
    """Top-k region classification accuracy of ground-truth boxes, in percent.

    A box counts as right at ``k`` when its true category is among its ``k`` best-scored
    columns (``k`` capped at C). With a split, ``base`` and ``novel`` cover the boxes whose
    true category is in that part, still classified over the whole vocabulary.

    Returns:
        ``{"overall": {"top1": %, "top5": %, "boxes": n}, "base": {...}, "novel": {...}}``
        (keys follow ``ks``); a part with no boxes has ``None`` accuracies.

    Raises:
        BadInput: shapes or ids that do not line up (see the module docstring).
        BadAnnotations: an annotation id not of its image, or a bad split.
    """
    anns, scores = _gather(coco_gt, box_scores, ann_ids, category_ids)
    column = {c: i for i, c in enumerate(category_ids)}
    truth = torch.tensor([column[a["category_id"]] for a in anns], dtype=torch.int64)
    k_max = min(max(ks), len(category_ids))
    top = scores.topk(k_max, dim=1).indices  # (N, k_max), best first
    hits = {k: (top[:, : min(k, k_max)] == truth[:, None]).any(dim=1) for k in ks}

    groups = {"overall": torch.ones(len(anns), dtype=torch.bool)}
    if split is not None:
        for part, ids in split_category_ids(coco_gt, split).items():
            members = set(ids)
            groups[part] = torch.tensor([a["category_id"] in members for a in anns], dtype=torch.bool)
    report = {}
    for name, mask in groups.items():
        report[name] = {f"top{k}": _percent(hit[mask]) for k, hit in hits.items()}
        report[name]["boxes"] = int(mask.sum())
    return report


def _percent(hit: torch.Tensor) -> float | None:
    return float(hit.float().mean() * 100) if hit.numel() else None


def gt_box_records(
    coco_gt: COCO,
    box_scores: Mapping[int, ScoreMatrix],
    ann_ids: Mapping[int, Sequence[int]],
    category_ids: Sequence[int],
    top_k: int = 5,
) -> list[dict]:
    """COCO results records for the labelled ground-truth boxes, for ``coco_map``.

    Each box yields its ``top_k`` best categories (capped at C), each record carrying the
    box's own ``[x, y, w, h]`` and the score from ``box_scores`` (pass probabilities: mAP ranks
    records across boxes, so scores must be comparable between them).
    """
    anns, scores = _gather(coco_gt, box_scores, ann_ids, category_ids)
    values, columns = scores.topk(min(top_k, len(category_ids)), dim=1)
    records = []
    for ann, row_values, row_columns in zip(anns, values.tolist(), columns.tolist()):
        for score, col in zip(row_values, row_columns):
            records.append({
                "image_id": ann["image_id"],
                "category_id": int(category_ids[col]),
                "bbox": [float(v) for v in ann["bbox"]],
                "score": float(score),
            })
    return records
