"""Region-text scoring: logits -> probabilities -> labelled, filtered ``Detections``.

Plain functions, each a step of ``RegionCLIP``'s ``logits`` and ``postprocess`` stages and each
usable alone: ``region_logits`` gives the full (boxes x labels [+ background]) matrix that
training, the GT-box protocol and detection all start from. ``select`` is the default recipe's
selection; ``select_pairs`` (with ``batched_soft_nms``) RegionCLIP's (``scoring.recipe``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou, nms

from .config import ScoringConfig
from .detections import Detections
from .doubt import figures


# RegionCLIP's soft-NMS settings (MODEL.ROI_HEADS.SOFT_NMS_{METHOD,SIGMA,PRUNE}: gaussian, 0.5, 0.001).
SOFT_NMS_SIGMA = 0.5
SOFT_NMS_PRUNE = 0.001


def region_logits(regions: torch.Tensor, text_emb: torch.Tensor, scale: float | torch.Tensor,
                  background: bool, background_embedding: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) region features and (L, D) unit-norm text embeddings -> (N, L [+ 1]) float32 logits.

    ``scale * cosine``; with ``background`` a last column: zeros (a zero "background"
    embedding, the constant logit training used), or ``scale * normalize(region) . background_embedding``
    for a learned (1, D) one, used as stored (RegionCLIP's ``cls_bg_score``, not normalised).
    ``scale`` may be a tensor with gradients. Computed in fp32 whatever the autocast around it:
    a bf16 matmul rounds logits at scale 100 to steps of about 0.25, and the softmax reads them.
    """
    with torch.autocast(regions.device.type, enabled=False):
        regions = F.normalize(regions.float(), dim=-1)
        logits = scale * regions @ text_emb.float().T
        if background:
            if background_embedding is None:
                bg = logits.new_zeros((len(logits), 1))
            else:
                bg = scale * regions @ background_embedding.float().reshape(1, -1).T
            logits = torch.cat([logits, bg], dim=1)
    return logits


def probabilities(logits: torch.Tensor, num_labels: int, objectness: torch.Tensor | None,
                  cfg: ScoringConfig) -> torch.Tensor:
    """(N, L [+ 1]) logits -> (N, L) scores in [0, 1].

    Softmax over the vocabulary (and background, which is then dropped), fused with RPN
    ``objectness`` (N,) as p^(1-w) * o^w when given and ``cfg.objectness_weight`` > 0.
    """
    probs = logits.float().softmax(dim=-1)[:, :num_labels]
    if objectness is not None and cfg.objectness_weight > 0:
        w = cfg.objectness_weight
        probs = probs.pow(1 - w) * objectness.float().clamp(min=0)[:, None].pow(w)
    return probs


def drop_negatives(probs: torch.Tensor, num_negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C + M) scores whose last ``num_negatives`` columns are negatives (or distractors) ->
    ``(keep (N,) bool, (N, C) class scores)``: a box whose best column is one of them is not kept."""
    if num_negatives <= 0:
        return torch.ones(len(probs), dtype=torch.bool, device=probs.device), probs
    classes = probs.shape[1] - num_negatives
    return probs.argmax(dim=1) < classes, probs[:, :classes]


def class_thresholds(rules, default: float, num_classes: int, like: torch.Tensor) -> torch.Tensor | float:
    """The score threshold per class (C,) on ``like``'s device (``rules.thresholds``, the global
    ``default`` where unset), or the plain ``default`` without rules."""
    if rules is None:
        return default
    return torch.tensor(rules.threshold_list(default, num_classes), dtype=torch.float32, device=like.device)


def select(boxes_xyxy: torch.Tensor, probs: torch.Tensor, cfg: ScoringConfig, vocabulary: Sequence[str],
           filter_boxes: bool = True, rules=None) -> Detections:
    """Each box's top-k labels; with ``filter_boxes`` the score threshold, per-label NMS, the
    class-agnostic NMS (``cfg.agnostic_nms``) and ``max_detections``. Without it every box
    comes back with its k labels, in input order. Stays on the tensors' device.

    ``rules`` (``exemplars.VocabRules``): ``probs`` has ``rules.extra`` columns after the classes
    (negatives, then distractors), each class its own threshold. With ``filter_boxes`` a box whose
    best match is an extra column goes through the threshold and both NMS with its labels, so it
    suppresses weaker boxes on the same object, and is then removed with every extra label;
    ``max_detections`` counts what is left. Given boxes only lose the extra columns."""
    extra = rules.extra if rules is not None else 0
    classes = probs.shape[1] - extra
    if extra and not filter_boxes:
        probs = probs[:, :classes]
    k = max(1, min(cfg.top_k, probs.shape[1]))
    scores, label_ids = probs.topk(k, dim=1)
    won = label_ids[:, :1].expand(-1, k).reshape(-1) >= classes  # the box's best match is an extra row
    boxes = boxes_xyxy.float()[:, None].expand(-1, k, 4).reshape(-1, 4)
    scores, label_ids = scores.reshape(-1), label_ids.reshape(-1)
    if not filter_boxes:
        return Detections(boxes, scores, label_ids, tuple(vocabulary))
    per_class = class_thresholds(rules, cfg.score_threshold, classes, scores)
    if rules is not None:
        thr = torch.cat([per_class, per_class.new_full((extra,), float(cfg.score_threshold))])[label_ids]
    else:
        thr = scores.new_full(scores.shape, float(cfg.score_threshold))
    keep = torch.nonzero(scores >= thr).flatten()
    keep = keep[batched_nms(boxes[keep], scores[keep], label_ids[keep], cfg.nms_iou)]
    if cfg.agnostic_nms:
        keep = keep[nms(boxes[keep], scores[keep], cfg.agnostic_nms_iou)]
    if extra:
        keep = keep[~won[keep] & (label_ids[keep] < classes)]
    keep = keep[: cfg.max_detections]
    doubt = figures(probs, boxes_xyxy, keep // k, label_ids[keep], scores[keep], thr[keep], per_class, classes,
                    _cover_iou(cfg))
    return Detections(boxes[keep], scores[keep], label_ids[keep], tuple(vocabulary), doubt)


def _cover_iou(cfg: ScoringConfig) -> float:
    """The overlap at which a kept box claims another (``doubt.figures``): the lowest at which an
    NMS of the selection would have suppressed it, so no suppressed duplicate counts as a miss."""
    return min(cfg.nms_iou, cfg.agnostic_nms_iou) if cfg.agnostic_nms else cfg.nms_iou


def select_pairs(boxes_xyxy: torch.Tensor, scores: torch.Tensor, cfg: ScoringConfig,
                 vocabulary: Sequence[str], rules=None) -> Detections:
    """RegionCLIP's selection (``fast_rcnn_inference_single_image``): (N, 4) xyxy boxes, one per
    row for every label (class-agnostic), and (N, L) scores -> every (box, label) pair scoring
    above ``cfg.score_threshold``, per-label NMS at ``cfg.nms_iou`` (``batched_soft_nms`` with
    ``cfg.soft_nms``, its rescored values then the scores), the best ``cfg.max_detections``, then
    empty boxes dropped (detectron2's ``detector_postprocess``). Stays on the tensors' device.
    ``rules``: negatives and per-class thresholds, as in ``select``."""
    if rules is not None:
        keep, scores = drop_negatives(scores, rules.extra)
        boxes_xyxy, scores = boxes_xyxy[keep], scores[keep]
    thr = class_thresholds(rules, cfg.score_threshold, scores.shape[1], scores)
    rows, label_ids = torch.nonzero(scores >= thr, as_tuple=True)
    boxes, kept = boxes_xyxy.float()[rows], scores.float()[rows, label_ids]
    if cfg.soft_nms:
        keep, kept = batched_soft_nms(boxes, kept, label_ids, max_picks=cfg.max_detections)
    else:
        keep = batched_nms(boxes, kept, label_ids, cfg.nms_iou)
        kept = kept[keep]
    keep, kept = keep[: cfg.max_detections], kept[: cfg.max_detections]
    boxes, label_ids, rows = boxes[keep], label_ids[keep], rows[keep]
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    pair_thr = thr[label_ids] if isinstance(thr, torch.Tensor) else kept.new_full(kept.shape, float(thr))
    doubt = figures(scores, boxes_xyxy, rows[nonempty], label_ids[nonempty], kept[nonempty], pair_thr[nonempty], thr,
                    scores.shape[1], cfg.nms_iou)
    return Detections(boxes[nonempty], kept[nonempty], label_ids[nonempty], tuple(vocabulary), doubt)


def batched_soft_nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                     sigma: float = SOFT_NMS_SIGMA, prune: float = SOFT_NMS_PRUNE,
                     max_picks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian soft-NMS within each value of ``idxs`` (Bodla et al. 2017), as RegionCLIP runs it.

    ``boxes_xyxy`` (N, 4), ``scores`` (N,), ``idxs`` (N,) labels. Repeatedly takes the best box and
    multiplies every other score by ``exp(-IoU^2 / sigma)``, dropping those at or below ``prune``.
    Returns ``(keep, rescored)``: indices into the inputs and their new scores, in decreasing order.
    One step per kept box. ``max_picks`` stops after that many: a score is only ever multiplied
    by factors <= 1, so no later pick outranks an earlier one and the first ``max_picks`` are
    exactly those of the full run (RegionCLIP keeps 100 of up to 65,000 pairs per image).
    """
    if not len(boxes_xyxy):
        return idxs.new_zeros((0,), dtype=torch.int64), scores.new_zeros((0,))
    # Labels never interact: shift each label's boxes apart (torchvision's batched_nms trick).
    shifted = boxes_xyxy.float() + (idxs.to(boxes_xyxy) * (boxes_xyxy.max() + 1))[:, None]
    left, order = scores.float().clone(), torch.arange(len(scores), device=scores.device)
    keep, rescored = [], []
    while len(left) and (max_picks is None or len(keep) < max_picks):
        top = torch.argmax(left)
        keep.append(order[top])
        rescored.append(left[top])
        iou = box_iou(shifted[top, None], shifted)[0].nan_to_num(0.0)  # two empty boxes: IoU 0, as detectron2
        left = left * torch.exp(-iou.pow(2) / sigma)
        alive = left > prune
        alive[top] = False
        shifted, left, order = shifted[alive], left[alive], order[alive]
    return torch.stack(keep), torch.stack(rescored)


def regionclip_scores(probs: torch.Tensor, objectness_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(R, N + 1) probabilities -> (R, N) detection scores, background dropped.

    With RPN ``objectness_logits`` (R,) (zero-shot, ``MULTIPLY_RPN_SCORE``): ``sqrt(p * logit)``.
    RegionCLIP drops boxes whose product is negative (NaN scores fail its finiteness check); here
    they score 0, which no positive score threshold keeps either.
    """
    scores = probs[:, :-1].float()
    if objectness_logits is not None:
        scores = (scores * objectness_logits.float()[:, None]).clamp(min=0).sqrt()
    return scores


def score_regions(
    region_emb: torch.Tensor,
    text_emb: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    objectness: torch.Tensor | None,
    cfg: ScoringConfig,
    logit_scale: float,
    vocabulary: Sequence[str],
    filter_boxes: bool = True,
) -> Detections:
    """The three steps for one image: ``region_emb`` (N, D), ``text_emb`` (L, D), ``boxes_xyxy``
    (N, 4), ``objectness`` (N,) or None -> ``Detections``."""
    logits = region_logits(region_emb, text_emb, logit_scale, cfg.background)
    probs = probabilities(logits, len(text_emb), objectness, cfg)
    return select(boxes_xyxy, probs, cfg, vocabulary, filter_boxes)
