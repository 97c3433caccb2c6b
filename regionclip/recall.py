"""Class-agnostic proposal recall: the share of ground-truth boxes the proposal stage finds.

Open-vocabulary detection can only name what is proposed, so recall is measured on the proposal
stage's own output (``RegionCLIP.propose``: after the RPN's NMS, and after the second stage's move
with ``proposals.source: refined``), per split, labels ignored. A ground-truth box counts as
found at IoU t within the top K when one of the K most confident proposals is matched to it at
IoU >= t, one to one as COCOeval matches (``useCats=0``): proposals in decreasing score each take
the still unmatched box they overlap most, so one proposal covering two touching objects finds
one of them.

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
UNMATCHED = torch.iinfo(torch.long).max  # the rank of no proposal: past every K


class ProposalRecall:
    """Accumulates, for every ground-truth box of a COCO set, the IoU thresholds at which one of
    the top-K proposals is matched to it.

    ``coco`` is a pycocotools ``COCO``; ``split`` ``{"base": [names], "novel": [names]}`` or None.
    Crowd boxes are left out, as COCOeval leaves them out of recall (a proposal it matches to a
    crowd box is one that overlaps no other box at that IoU, so it takes none from them either).
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
        # Per part, a list of (G, len(tops), len(IOU_THRESHOLDS)) bool tensors (found), one per image.
        self._found: dict[str, list[torch.Tensor]] = {p: [] for p in self.parts}

    def add(self, image_id: int, boxes_xyxy: torch.Tensor, scores: torch.Tensor) -> None:
        """One image's proposals: ``boxes_xyxy`` (P, 4) in original-image pixels, ``scores`` (P,)
        objectness (any monotone score: probabilities or logits rank alike)."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not anns:
            return
        gt = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float64), "xywh", "xyxy")
        boxes = boxes_xyxy.detach().to("cpu", torch.float64)
        order = torch.argsort(scores.detach().to("cpu", torch.float64), descending=True, stable=True)
        top = boxes[order[: max(self.tops)]]
        iou = box_iou(top, gt) if len(top) else torch.zeros((0, len(gt)), dtype=torch.float64)
        rank = match_ranks(iou)
        found = torch.stack([rank < k for k in self.tops], dim=1)
        part = [self._part_of.get(a["category_id"]) for a in anns]
        self._found["overall"].append(found)
        for p in self.parts[1:]:
            rows = torch.tensor([q == p for q in part], dtype=torch.bool)
            if rows.any():
                self._found[p].append(found[rows])

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per part (``overall``, and ``base``/``novel`` with a split): ``gt`` (boxes counted),
        ``R50@K`` and ``AR@K`` in percent for each K, None for a part without boxes."""
        out = {}
        for part in self.parts:
            found = (torch.cat(self._found[part]) if self._found[part]
                     else torch.zeros((0, len(self.tops), len(IOU_THRESHOLDS)), dtype=torch.bool))
            row: dict[str, float | int | None] = {"gt": len(found)}
            for j, k in enumerate(self.tops):
                if not len(found):
                    row[f"R50@{k}"] = row[f"AR@{k}"] = None
                    continue
                row[f"R50@{k}"] = round(100.0 * float(found[:, j, 0].double().mean()), 2)
                row[f"AR@{k}"] = round(100.0 * float(found[:, j].double().mean()), 2)
            out[part] = row
        return out

    def merge(self, other: "ProposalRecall") -> None:
        """Add another process's accumulated boxes (sharded evaluation)."""
        for part in self.parts:
            self._found[part] += other._found.get(part, [])


def match_ranks(iou: torch.Tensor) -> torch.Tensor:
    """(P, G) IoUs of proposals ranked by decreasing score against G boxes -> (G, T) long: per
    box and IoU threshold of ``IOU_THRESHOLDS``, the rank of the proposal matched to it (``UNMATCHED``
    where none is). COCOeval's greedy matching: each proposal in turn takes the unmatched box of
    highest IoU >= the threshold (of equal IoUs the last box, as COCOeval's loop does)."""
    thresholds = IOU_THRESHOLDS.to(iou.dtype) - 1e-12
    rank = torch.full((iou.shape[1], len(thresholds)), UNMATCHED, dtype=torch.long)
    if not iou.numel():
        return rank
    taken = torch.zeros((len(thresholds), iou.shape[1]), dtype=torch.bool)
    useful = torch.nonzero(iou.max(dim=1).values >= thresholds[0]).flatten()  # the others match nothing
    for d in useful.tolist():
        ok = (iou[d][None] >= thresholds[:, None]) & ~taken  # (T, G)
        cand = torch.where(ok, iou[d][None], torch.full_like(ok, -1, dtype=iou.dtype))
        best = iou.shape[1] - 1 - cand.flip(1).argmax(dim=1)  # of equal IoUs the last box
        hit = ok.any(dim=1)
        t = torch.nonzero(hit).flatten()
        taken[t, best[t]] = True
        rank[best[t], t] = d
    return rank
