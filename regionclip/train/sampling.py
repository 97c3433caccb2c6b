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
    region's is its own box). A GT box labelled ``NEGATIVE`` (-1: a hard negative, none of the
    names) and the proposals on it are background. ``ignore`` (per image, (M, 4) xyxy) keeps
    background samples off those boxes (IoU < ``objectness.IGNORE_IOU``): regions of objects
    nobody labelled."""
    device = targets[0]["boxes"].device
    ignore = ignore if ignore is not None else [None] * len(targets)
    # Every proposal of the batch gets a kind: 0 positive, 1 background near a GT box, 2 far
    # background, 3 none. One pass over the batch then samples each image's quota of each kind,
    # so a step waits for the device twice, not a few times per image.
    props, kinds, match_all, owner = [], [], [], []
    gt_offset = 0
    for i, ((p, objectness), t, ig) in enumerate(zip(proposals, targets, ignore)):
        p, objectness = p.detach().float(), objectness.detach()
        if len(t["boxes"]):
            iou, match = box_iou(p, t["boxes"].float()).max(dim=1)
        else:  # an image without objects: every proposal is background
            iou, match = p.new_zeros(len(p)), torch.zeros(len(p), dtype=torch.long, device=p.device)
        big = (p[:, 2] - p[:, 0] >= 4) & (p[:, 3] - p[:, 1] >= 4)
        sure = objectness > lc.background_far_max_objectness
        free = ~near_ignore(p, ig)
        kind = torch.full((len(p),), 3, dtype=torch.long, device=p.device)
        kind = torch.where((iou < lc.background_iou_min) & ~sure & free, 2, kind)
        kind = torch.where((iou < lc.background_iou) & (iou >= lc.background_iou_min) & free, 1, kind)
        kind = torch.where(iou >= lc.positive_iou, 0, kind)
        kinds.append(torch.where(big, kind, 3))
        props.append(p)
        match_all.append(match + gt_offset)
        owner.append(torch.full((len(p),), i, dtype=torch.long, device=p.device))
        gt_offset += len(t["boxes"])
    p, kind, match, owner = torch.cat(props), torch.cat(kinds), torch.cat(match_all), torch.cat(owner)

    # A random order, then a stable sort by (image, kind): random within each group. A
    # proposal's rank in its group against its kind's quota picks a uniform sample of each.
    order = torch.randperm(len(p), device=device)
    order = order[torch.sort(owner[order] * 4 + kind[order], stable=True).indices]
    group = owner[order] * 4 + kind[order]
    rank = torch.arange(len(p), device=device) - torch.searchsorted(group, group)
    k = kind[order]
    # Quotas as Python scalars in where(): a small tensor built on the host would be a blocking copy.
    quota = torch.where(k == 0, lc.positive_samples, torch.where(
        k == 1, lc.background_samples, torch.where(k == 2, lc.background_far_samples, 0)))
    picked = order[rank < quota]  # grouped by image, then kind: positives first
    counts = torch.bincount(owner[picked], minlength=len(targets)).tolist()

    gt_boxes = torch.cat([t["boxes"] for t in targets]).float()
    # A hard negative's box (label NEGATIVE) and the proposals on it are background.
    gt_labels = torch.cat([t["labels"] for t in targets])
    gt_labels = torch.where(gt_labels < 0, background, gt_labels)
    positive = kind[picked] == 0
    if len(gt_labels):
        label = torch.where(positive, gt_labels[match[picked].clamp(max=len(gt_labels) - 1)], background)
        target = torch.where(positive[:, None], gt_boxes[match[picked].clamp(max=len(gt_labels) - 1)], p[picked])
    else:
        label = torch.full((len(picked),), background, dtype=torch.long, device=device)
        target = p[picked]
    boxes, labels, matched = [], [], []
    for t, b, lab, m in zip(targets, p[picked].split(counts), label.split(counts), target.split(counts)):
        boxes.append(torch.cat([t["boxes"].float(), b]))
        labels.append(torch.cat([torch.where(t["labels"] < 0, background, t["labels"]), lab]))
        matched.append(torch.cat([t["boxes"].float(), m]))
    return boxes, torch.cat(labels), matched
