"""Region-text scoring: logits -> probabilities -> labelled, filtered ``Detections``.

Three plain functions, each a stage of ``RegionCLIP`` (``logits`` and ``postprocess``) and each
usable alone: ``region_logits`` gives the full (boxes x labels [+ background]) matrix that
training, the GT-box protocol and detection all start from.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, nms

from .config import ScoringConfig
from .detections import Detections


def region_logits(regions: torch.Tensor, text_emb: torch.Tensor, scale: float | torch.Tensor,
                  background: bool) -> torch.Tensor:
    """(N, D) region features and (L, D) unit-norm text embeddings -> (N, L [+ 1]) float32 logits.

    ``scale * cosine``; with ``background`` a last column of zeros (a zero "background"
    embedding, the constant logit training used). ``scale`` may be a tensor with gradients.
    """
    logits = scale * F.normalize(regions.float(), dim=-1) @ text_emb.float().T
    if background:
        logits = torch.cat([logits, logits.new_zeros((len(logits), 1))], dim=1)
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


def select(boxes_xyxy: torch.Tensor, probs: torch.Tensor, cfg: ScoringConfig, vocabulary: Sequence[str],
           filter_boxes: bool = True) -> Detections:
    """Each box's top-k labels; with ``filter_boxes`` the score threshold, per-label NMS, the
    class-agnostic NMS (``cfg.agnostic_nms``) and ``max_detections``. Without it every box
    comes back with its k labels, in input order. Stays on the tensors' device."""
    k = max(1, min(cfg.top_k, probs.shape[1]))
    scores, label_ids = probs.topk(k, dim=1)
    boxes = boxes_xyxy.float()[:, None].expand(-1, k, 4).reshape(-1, 4)
    scores, label_ids = scores.reshape(-1), label_ids.reshape(-1)
    if filter_boxes:
        keep = scores >= cfg.score_threshold
        boxes, scores, label_ids = boxes[keep], scores[keep], label_ids[keep]
        keep = batched_nms(boxes, scores, label_ids, cfg.nms_iou)
        if cfg.agnostic_nms:
            keep = keep[nms(boxes[keep], scores[keep], cfg.agnostic_nms_iou)]
        keep = keep[: cfg.max_detections]
        boxes, scores, label_ids = boxes[keep], scores[keep], label_ids[keep]
    return Detections(boxes, scores, label_ids, tuple(vocabulary))


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
