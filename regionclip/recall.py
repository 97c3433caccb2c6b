"""Class-agnostic proposal recall: the share of ground-truth boxes the proposal stage finds.

Open-vocabulary detection can only name what is proposed, so recall is measured on the proposal
stage's own output (``RegionCLIP.propose``: after the RPN's NMS, and after the second stage's move
with ``proposals.source: refined``), per split, labels ignored. A ground-truth box counts as
found at IoU t within the top K when one of the K most confident proposals overlaps it at IoU >= t
(the best proposal per box, without COCOeval's one-to-one matching: proposals are not detections,
and one proposal covering two touching objects finds neither at a high IoU anyway).

Figures are in percent, like every figure of ``evaluate.py``:
    * ``R50@K``: recall at IoU 0.5 within the top K;
    * ``AR@K``: recall averaged over IoU 0.50:0.05:0.95 (COCO's average recall) within the top K.
K is ``TOPS`` (10, 100, 300); a model that keeps fewer proposals than K reports its all.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torchvision.ops import box_convert, box_iou

TOPS: tuple[int, ...] = (10, 100, 300)
IOU_THRESHOLDS = torch.arange(10, dtype=torch.float64) * 0.05 + 0.5  # 0.50, 0.55, ..., 0.95


class ProposalRecall:
    """Accumulates, for every ground-truth box of a COCO set, its best IoU with the top-K proposals.

    ``coco`` is a pycocotools ``COCO``; ``split`` ``{"base": [names], "novel": [names]}`` or None.
    Crowd boxes are left out, as COCOeval leaves them out of recall.
    """

    def __init__(self, coco, split: Mapping[str, Sequence[str]] | None = None, tops: Sequence[int] = TOPS):
        self.coco = coco
        self.tops = tuple(int(k) for k in tops)
        names = {c["id"]: c["name"] for c in coco.cats.values()}
        part_of = {}
        for part, members in (split or {}).items():
            for name in members:
                part_of[name] = part
        self.parts = ["overall"] + [p for p in ("base", "novel") if split and p in split]
        self._part_of = {cid: part_of.get(name) for cid, name in names.items()}
        # Per part, a list of (G, len(tops)) best-IoU tensors, one per image.
        self._best: dict[str, list[torch.Tensor]] = {p: [] for p in self.parts}

    def add(self, image_id: int, boxes_xyxy: torch.Tensor, scores: torch.Tensor) -> None:
        """One image's proposals: ``boxes_xyxy`` (P, 4) in original-image pixels, ``scores`` (P,)
        objectness (any monotone score: probabilities or logits rank alike)."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not anns:
            return
        gt = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float64), "xywh", "xyxy")
        boxes = boxes_xyxy.detach().to("cpu", torch.float64)
        order = torch.argsort(scores.detach().to("cpu", torch.float64), descending=True, stable=True)
        iou = box_iou(boxes[order], gt) if len(boxes) else torch.zeros((0, len(gt)), dtype=torch.float64)
        best = torch.stack([
            iou[:k].max(dim=0).values if len(iou[:k]) else torch.zeros(len(gt), dtype=torch.float64)
            for k in self.tops
        ], dim=1)
        part = [self._part_of.get(a["category_id"]) for a in anns]
        self._best["overall"].append(best)
        for p in self.parts[1:]:
            rows = torch.tensor([q == p for q in part], dtype=torch.bool)
            if rows.any():
                self._best[p].append(best[rows])

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per part (``overall``, and ``base``/``novel`` with a split): ``gt`` (boxes counted),
        ``R50@K`` and ``AR@K`` in percent for each K, None for a part without boxes."""
        out = {}
        for part in self.parts:
            best = torch.cat(self._best[part]) if self._best[part] else torch.zeros((0, len(self.tops)))
            row: dict[str, float | int | None] = {"gt": len(best)}
            for j, k in enumerate(self.tops):
                if not len(best):
                    row[f"R50@{k}"] = row[f"AR@{k}"] = None
                    continue
                found = best[:, j, None] >= IOU_THRESHOLDS[None] - 1e-12
                row[f"R50@{k}"] = round(100.0 * float(found[:, 0].double().mean()), 2)
                row[f"AR@{k}"] = round(100.0 * float(found.double().mean()), 2)
            out[part] = row
        return out

    def merge(self, other: "ProposalRecall") -> None:
        """Add another process's accumulated boxes (sharded evaluation)."""
        for part in self.parts:
            self._best[part] += other._best.get(part, [])
