"""The regions a box fine-tuning step trains on, sampled from the RPN's proposals as Fast
R-CNN samples its RoIs (``loop.RegionTextLoss`` calls it)."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from ..objectness import near_ignore


def sample_regions(proposals, targets, lc, background: int,
                   ignore: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The regions one step trains on, as Fast R-CNN samples its RoIs, from ``proposals``
    (per image ``(boxes (K, 4) xyxy, objectness (K,))``, e.g. ``RegionCLIP.propose``'s): every
    GT box with its label; up to ``lc.positive_samples`` proposals per image with IoU >=
    ``lc.positive_iou`` to a GT box, with that box's label (inference classifies imperfect
    boxes, not GT ones); up to ``lc.background_samples`` proposals with IoU < ``lc.background_iou``
    to every GT box and >= ``lc.background_iou_min`` to some GT box, plus up to
    ``lc.background_far_samples`` below ``lc.background_iou_min`` with objectness at most
    ``lc.background_far_max_objectness``, all labelled ``background``. Returns per-image boxes,
    the (sum N,) labels and per-image matched GT boxes (a box regression target; a background
    region's is its own box). ``ignore`` (per image, (M, 4) xyxy) keeps background samples off
    those boxes (IoU < ``objectness.IGNORE_IOU``): regions of objects nobody labelled."""
    boxes, labels, matched = [], [], []
    ignore = ignore if ignore is not None else [None] * len(targets)
    for (p, objectness), t, ig in zip(proposals, targets, ignore):
        p, objectness = p.detach(), objectness.detach()
        big = (p[:, 2] - p[:, 0] >= 4) & (p[:, 3] - p[:, 1] >= 4)
        p = p[big].float()
        sure = objectness[big] > lc.background_far_max_objectness
        if len(t["boxes"]):
            iou, match = box_iou(p, t["boxes"]).max(dim=1)
        else:  # an image without objects: every proposal is background
            iou, match = p.new_zeros(len(p)), torch.zeros(len(p), dtype=torch.long, device=p.device)
        pos = torch.nonzero(iou >= lc.positive_iou).flatten()
        free = ~near_ignore(p, ig)
        neg = torch.nonzero((iou < lc.background_iou) & (iou >= lc.background_iou_min) & free).flatten()
        far = torch.nonzero((iou < lc.background_iou_min) & ~sure & free).flatten()
        pos = pos[torch.randperm(len(pos))[:lc.positive_samples].to(pos.device)]
        neg = torch.cat([neg[torch.randperm(len(neg))[:lc.background_samples].to(neg.device)],
                         far[torch.randperm(len(far))[:lc.background_far_samples].to(far.device)]])
        boxes.append(torch.cat([t["boxes"], p[pos], p[neg]]))
        labels.append(torch.cat([t["labels"], t["labels"][match[pos]], t["labels"].new_full((len(neg),), background)]))
        matched.append(torch.cat([t["boxes"], t["boxes"][match[pos]], p[neg]]))
    return boxes, torch.cat(labels), matched
