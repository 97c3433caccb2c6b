"""The proposal stage's training targets: what the RPN learns to call an object.

torchvision's RPN trains objectness as a classifier: anchors near a labelled box are positives,
everything else below IoU 0.3 is a negative. In open-vocabulary training the images hold objects
nobody labelled (COCO's non-COCO things; shapes' novel categories), so the classifier learns
"unlabelled = background" and stops proposing exactly what the CLIP side is there to name
(measured on the demo model: novel recall 0.79 against base 0.97 at top 100, 0.33 against 0.91
at top 10). Two ways out, each a ``loss.proposal_objectness`` / ``loss.proposal_ignore`` choice:

* ``centerness`` (OLN: Kim et al., "Learning Open-World Object Proposals without Learning to
  Classify", RA-L 2022): the objectness logit regresses how well an anchor is centred on a
  labelled box (FCOS centerness of the anchor's centre), trained on positives only (anchors at
  IoU >= 0.3 to a box). No anchor is ever pushed down for lying on an unlabelled object.
  The target is a probability in [0, 1]: the logit's sigmoid stays "objectness" for every
  caller (fusion, thresholds, the ONNX graph) and BCE with soft targets trains it.
* ``ignore``: torchvision's classifier, but negatives that overlap an ignore region (the boxes a
  teacher picks for caption concepts that no box labels) are left out of the loss, and with
  ``loss.proposal_caption_positives`` those boxes are positives too.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

OBJECTNESS = ("classify", "centerness")
# OLN samples anchors above this IoU to a labelled box for its localization-quality target.
QUALITY_IOU = 0.3
# A negative anchor overlapping an ignore box this much is left out: caption pseudo-boxes are
# loose (a teacher's pick among proposals), so a low bar, as Fast R-CNN's 0.1 background floor.
IGNORE_IOU = 0.1


def centerness(points: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of each point in its box: ``sqrt(min(l, r)/max(l, r) * min(t, b)/max(t, b))``.

    ``points`` (N, 2) xy and ``boxes_xyxy`` (N, 4), paired row by row. Returns (N,) in [0, 1]:
    1 at the box centre, 0 on or outside its border.
    """
    left = points[:, 0] - boxes_xyxy[:, 0]
    right = boxes_xyxy[:, 2] - points[:, 0]
    top = points[:, 1] - boxes_xyxy[:, 1]
    bottom = boxes_xyxy[:, 3] - points[:, 1]
    lr = torch.stack([left, right], dim=1)
    tb = torch.stack([top, bottom], dim=1)
    inside = (lr.min(dim=1).values > 0) & (tb.min(dim=1).values > 0)
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values.clamp(min=1e-6)) * (
        tb.min(dim=1).values / tb.max(dim=1).values.clamp(min=1e-6))
    return torch.where(inside, ratio.clamp(min=0).sqrt(), torch.zeros_like(ratio))


def centerness_loss(logits: torch.Tensor, anchors: Sequence[torch.Tensor], gt_boxes: Sequence[torch.Tensor],
                    samples_per_image: int) -> torch.Tensor:
    """OLN's objectness loss: BCE of each sampled anchor's logit against its centerness.

    ``logits`` (B * A,) as torchvision's ``concat_box_prediction_layers`` flattens them (image
    major), ``anchors`` per image (A, 4) and ``gt_boxes`` per image (G, 4), all xyxy in the
    same (resized) pixels. Up to ``samples_per_image`` anchors at IoU >= ``QUALITY_IOU`` to a
    box are drawn per image (torch's RNG); images without boxes contribute nothing. Returns a
    scalar, the mean over the drawn anchors (0 when none, still in the graph).
    """
    per_image = logits.view(len(anchors), -1)
    picked, targets = [], []
    for lg, a, gt in zip(per_image, anchors, gt_boxes):
        if not len(gt):
            continue
        iou, match = box_iou(a.float(), gt.float()).max(dim=1)
        pos = torch.nonzero(iou >= QUALITY_IOU).flatten()
        pos = pos[torch.randperm(len(pos), device=pos.device)[:samples_per_image]]
        centres = (a[pos, :2] + a[pos, 2:]) / 2
        picked.append(lg[pos])
        targets.append(centerness(centres.float(), gt[match[pos]].float()))
    if not picked or not sum(len(p) for p in picked):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(torch.cat(picked).float(), torch.cat(targets))


def near_ignore(boxes_xyxy: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
    """(N,) bool: which of ``boxes_xyxy`` (N, 4) overlap one of the ``ignore`` boxes (M, 4) at
    IoU >= ``IGNORE_IOU`` (all False when there are none)."""
    if ignore is None or not len(ignore) or not len(boxes_xyxy):
        return torch.zeros(len(boxes_xyxy), dtype=torch.bool, device=boxes_xyxy.device)
    return box_iou(boxes_xyxy.float(), ignore.float().to(boxes_xyxy.device)).max(dim=1).values >= IGNORE_IOU


def ignore_negatives(labels: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor],
                     ignore: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per image, torchvision's anchor labels (1 object, 0 background, -1 ignored) with every
    background anchor at IoU >= ``IGNORE_IOU`` to one of that image's ``ignore`` boxes set to -1."""
    return [torch.where((lab == 0) & near_ignore(a, ig), torch.full_like(lab, -1), lab)
            for lab, a, ig in zip(labels, anchors, ignore)]
