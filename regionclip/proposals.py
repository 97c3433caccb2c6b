"""A torchvision Faster R-CNN used as a class-agnostic proposal stage.

The composition mirrors torchvision's ``GeneralizedRCNN`` (transform -> backbone -> rpn) but
keeps what ``RegionProposalNetwork.forward`` throws away: the objectness of each proposal,
which the detector fuses with the region-text score, and on request its raw logit (RegionCLIP
multiplies by the logit, and a sigmoid in fp32 is exactly 1 above a logit of about 16.6).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from .config import ProposalConfig
from .errors import BadInput, WeightsUnavailable
from .objectness import OBJECTNESS, centerness_loss, ignore_negatives, near_ignore
from .skip_init import skip_init
from .weights import Resolved, load_state

SOURCES = ("rpn", "refined", "final")
# The second stage: unused with source="rpn", and most of a small detector's weights.
HEAD_PREFIXES = ("roi_heads.box_head.", "roi_heads.box_predictor.")


def build_detector(resolved: Resolved, state: dict | None = None, head_width: int | None = None) -> FasterRCNN:
    """Build ``resolved.model`` and load its weights (``state`` wins over ``resolved.path``).

    The class count follows the checkpoint, so class-agnostic proposal detectors trained by
    ``regionclip train`` (2 classes) load as well as torchvision's COCO ones (91). So does the
    second stage's width: ``head_width`` (``proposals.box_head_width``) builds a narrower one
    than torchvision's 1024 when the checkpoint holds none.
    """
    if state is None and resolved.path is not None:
        state = load_state(resolved.path)
        state = state.get("model", state) if isinstance(state, dict) else state
    num_classes = 91 if head_width is None else 2
    if state is not None:
        if "rpn.head.cls_logits.weight" not in state:
            raise WeightsUnavailable(
                f"{resolved.path or 'checkpoint'} is not a {resolved.model} state dict "
                "(no rpn.head); pass a torchvision Faster R-CNN checkpoint"
            )
        cls = state.get("roi_heads.box_predictor.cls_score.weight")
        num_classes = cls.shape[0] if cls is not None else 2
        fc6 = state.get("roi_heads.box_head.fc6.weight")
        head_width = int(fc6.shape[0]) if fc6 is not None else head_width
    # Weights that the state replaces are not drawn first; without a second stage in the state,
    # that one keeps its random init (and so does everything, to keep the random stream as it was).
    whole = state is not None and any(k.startswith(HEAD_PREFIXES) for k in state)
    with skip_init() if whole else contextlib.nullcontext():
        model = torchvision.models.get_model(
            resolved.model, weights=None, weights_backbone=None, num_classes=num_classes
        )
        if head_width is not None and head_width != model.roi_heads.box_head.fc7.out_features:
            # torchvision's builders fix the width at 1024: 12.8M of a MobileNet detector's 19M weights.
            pooled = model.roi_heads.box_roi_pool.output_size
            side = pooled if isinstance(pooled, int) else pooled[0]
            model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * side * side, head_width)
            model.roi_heads.box_predictor = FastRCNNPredictor(head_width, num_classes)
    if state is not None:
        try:
            # regionclip saves RPN-only detectors without the box head (see RegionCLIP.save);
            # anything else missing is a wrong checkpoint.
            result = model.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIXES) or whole]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"Error(s) in loading state_dict:\n  missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
            model.has_box_head = not result.missing_keys
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)[:200]
            raise WeightsUnavailable(
                f"{resolved.path or 'checkpoint'} does not fit {resolved.model}: {first}"
            ) from None
    return model


def frozen_backbone_prefixes(detector: FasterRCNN, trainable_layers: int) -> list[str]:
    """Parameter-name prefixes of ``detector`` that torchvision's ``trainable_backbone_layers``
    leaves frozen: ResNets train their last ``trainable_layers`` of layer4..layer1, conv1 (bn1
    with all 5); MobileNets their last ``trainable_layers`` stages (strided blocks). Raises
    ``BadInput`` outside torchvision's range for the backbone."""
    body = detector.backbone.body
    names = [name for name, _ in body.named_children()]
    if "layer4" in names:
        if not 0 <= trainable_layers <= 5:
            raise BadInput(f"trainable_backbone_layers must be 0..5 for a ResNet backbone, not {trainable_layers}")
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
        frozen = [name for name in names if name not in train]
    else:
        blocks = list(body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        if not 0 <= trainable_layers <= len(stages):
            raise BadInput(f"trainable_backbone_layers must be 0..{len(stages)} for this backbone, not {trainable_layers}")
        before = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        frozen = names[:before]
    # The trailing dot keeps block "1" from also freezing blocks "10".."16".
    return [f"backbone.body.{name}." for name in frozen]


class ProposalStage(nn.Module):
    """Class-agnostic boxes with an objectness score, in original-image pixels.

    ``source="rpn"``: RPN proposals after its NMS, scored by sigmoid objectness.
    ``source="refined"``: the same proposals and objectness, each box moved by the second stage's
    class-agnostic regression (its classifier is not used: trained on base boxes only, it would
    call every unlabelled object background).
    ``source="final"``: the box head's per-class outputs merged across classes (class-agnostic
    NMS), scored by the best class probability.
    """

    def __init__(self, detector: FasterRCNN, cfg: ProposalConfig):
        super().__init__()
        if cfg.source not in SOURCES:
            raise BadInput(f"unknown proposal source '{cfg.source}': use one of {', '.join(SOURCES)}")
        self.detector = detector
        self.cfg = cfg
        self.configure(cfg)

    def configure(self, cfg: ProposalConfig) -> None:
        if cfg.source != "rpn" and not getattr(self.detector, "has_box_head", True):
            raise WeightsUnavailable(
                f"proposals.source={cfg.source} needs the detector's second stage, and this checkpoint was "
                "saved without its box head (RPN-only training): use proposals.source=rpn"
            )
        if cfg.anchor_scale <= 0:
            raise BadInput(f"proposals.anchor_scale must be positive, got {cfg.anchor_scale}")
        self.cfg = cfg
        t = self.detector.transform
        if cfg.min_size is not None:
            t.min_size = (cfg.min_size,)
        if cfg.max_size is not None:
            t.max_size = cfg.max_size
        rpn = self.detector.rpn
        if not hasattr(rpn, "base_anchor_sizes"):
            rpn.base_anchor_sizes = rpn.anchor_generator.sizes
        sizes = tuple(tuple(s * cfg.anchor_scale for s in level) for level in rpn.base_anchor_sizes)
        if sizes != rpn.anchor_generator.sizes:
            gen = rpn.anchor_generator
            # Generators with conventions of their own (zoo.Detectron2AnchorGenerator) rebuild themselves.
            rpn.anchor_generator = gen.with_sizes(sizes) if hasattr(gen, "with_sizes") else AnchorGenerator(sizes, gen.aspect_ratios)
        rpn._pre_nms_top_n = {"training": cfg.pre_nms_top_n, "testing": cfg.pre_nms_top_n}
        rpn._post_nms_top_n = {"training": cfg.num_proposals, "testing": cfg.num_proposals}
        rpn.nms_thresh = cfg.nms_threshold
        if not hasattr(rpn, "builder_score_thresh"):
            rpn.builder_score_thresh = rpn.score_thresh
        if cfg.score_threshold is not None and not 0 <= cfg.score_threshold < 1:
            raise BadInput(f"proposals.score_threshold must be in [0, 1), got {cfg.score_threshold}")
        rpn.score_thresh = rpn.builder_score_thresh if cfg.score_threshold is None else cfg.score_threshold
        heads = self.detector.roi_heads
        heads.detections_per_img = cfg.num_proposals
        heads.score_thresh = 1e-3

    def _rpn(self, images, features):
        """Run the RPN on a batch; return ``(boxes, logits, head)``: boxes and their raw logits
        per image in resized coordinates, and ``head = (logits, deltas, anchors)`` over every
        anchor, what ``_rpn_losses`` trains."""
        rpn = self.detector.rpn
        feats = list(features.values())
        logits, deltas = rpn.head(feats)
        # Geometry in fp32 whatever the autocast: the generator takes the feature maps' dtype
        # and decode the deltas', and bf16 keeps 8 bits of mantissa (past 512 px every
        # coordinate a multiple of 4). Empty fp32 views carry the maps' sizes and device.
        anchors = rpn.anchor_generator(images, [f[:, :0].float() for f in feats])
        per_level = [o[0].numel() for o in logits]
        logits, deltas = concat_box_prediction_layers(logits, deltas)
        logits, deltas = logits.float(), deltas.float()
        n = len(anchors)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(n, -1, 4)
        masked = self._mask_padding(logits.detach().view(n, -1), anchors, images.image_sizes,
                                    getattr(self.detector.transform, "size_divisible", 1))
        boxes, scores = self._filter(proposals, masked, images.image_sizes, per_level)
        return boxes, scores, (logits, deltas, anchors)

    def _rpn_losses(self, head, targets: list[dict], objectness: str = "classify",
                    ignore: list[torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """The RPN's losses against ``targets`` (resized pixels). ``objectness``: ``classify``
        (torchvision's: anchors near a box are objects, the rest background) or ``centerness``
        (OLN: localization quality of anchors near a box, no negatives; ``regionclip/objectness.py``).
        ``ignore`` boxes (per image, resized pixels) take their overlapping anchors out of the
        negatives. Box regression is torchvision's either way."""
        if objectness not in OBJECTNESS:
            raise BadInput(f"unknown proposal objectness '{objectness}': use one of {', '.join(OBJECTNESS)}")
        rpn = self.detector.rpn
        logits, deltas, anchors = head
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        if ignore is not None:
            labels = ignore_negatives(labels, anchors, ignore)
        reg_targets = rpn.box_coder.encode(matched, anchors)
        obj_loss, box_loss = rpn.compute_loss(logits, deltas, labels, reg_targets)
        if objectness == "centerness":
            obj_loss = centerness_loss(logits.flatten(), anchors, [t["boxes"] for t in targets],
                                       rpn.fg_bg_sampler.batch_size_per_image)
        return {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}

    def _filter(self, proposals: torch.Tensor, logits: torch.Tensor, sizes, per_level: list[int]):
        """``RegionProposalNetwork.filter_proposals`` keeping the raw logits: per level the top
        ``pre_nms_top_n``, clipped, small boxes dropped, NMS per level, the best ``post_nms_top_n``.
        Ranks by logit (as detectron2 does; the same order as by sigmoid wherever the sigmoid does
        not saturate). Returns per image ``(boxes (K, 4), logits (K,))`` without padding anchors."""
        rpn = self.detector.rpn
        n = len(proposals)
        levels = torch.cat([torch.full((k,), i, dtype=torch.int64, device=logits.device)
                            for i, k in enumerate(per_level)])[None].expand_as(logits)
        top = rpn._get_top_n_idx(logits, per_level)
        rows = torch.arange(n, device=logits.device)[:, None]
        logits, levels, proposals = logits[rows, top], levels[rows, top], proposals[rows, top]
        out_boxes, out_logits = [], []
        for boxes, lg, lvl, size in zip(proposals, logits, levels, sizes):
            boxes = clip_boxes_to_image(boxes, size)
            keep = remove_small_boxes(boxes, rpn.min_size)
            # An anchor that lived only in the padding has a logit of -inf: never kept.
            keep = keep[(torch.sigmoid(lg[keep]) >= rpn.score_thresh) & (lg[keep] > float("-inf"))]
            boxes, lg, lvl = boxes[keep], lg[keep], lvl[keep]
            keep = batched_nms(boxes, lg, lvl, rpn.nms_thresh)[: rpn.post_nms_top_n()]
            out_boxes.append(boxes[keep])
            out_logits.append(lg[keep])
        return out_boxes, out_logits

    @staticmethod
    def _mask_padding(logits: torch.Tensor, anchors: list[torch.Tensor], sizes, size_divisible: int = 1) -> torch.Tensor:
        """Anchors centred in the batch padding get -inf objectness.

        Without this, the proposals of an image depend on how much padding its batch added,
        and a batch would not give the same boxes as the same images one at a time. Each image
        keeps the padding it would get alone (its size rounded up to ``size_divisible``), as a
        detector run on one image does: masking that too changed 5-8 of the top 100 FPN
        proposals against detectron2's on sizes that are not multiples of 32.
        """
        out = logits.clone()
        d = max(1, int(size_divisible))
        for i, (a, (h, w)) in enumerate(zip(anchors, sizes)):
            h, w = -(-h // d) * d, -(-w // d) * d
            cx = (a[:, 0] + a[:, 2]) / 2
            cy = (a[:, 1] + a[:, 3]) / 2
            out[i][(cx >= w) | (cy >= h)] = float("-inf")
        return out

    def forward(self, images: list[torch.Tensor], logits: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``images``: 3xHxW float tensors in [0, 1] (RGB).

        Returns one ``(boxes_xyxy (K, 4), objectness (K,))`` per image, boxes in the pixels of
        that input image, K <= ``num_proposals``. ``logits=True`` gives the RPN's raw objectness
        logits instead of their sigmoid (``source="rpn"`` only).
        """
        if logits and self.cfg.source != "rpn":
            raise BadInput("raw objectness logits come from the RPN: use proposals.source=rpn")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = self.detector.transform(images)
        features = self.detector.backbone(batch.tensors)
        boxes, raw, _ = self._rpn(batch, features)
        scores = raw if logits else [torch.sigmoid(r) for r in raw]
        if self.cfg.source == "final":
            boxes, scores = self._final_boxes(batch, features, boxes)
        elif self.cfg.source == "refined":
            boxes = self._refined_boxes(batch, features, boxes)
        return [
            (resize_boxes(b, resized, orig), s)
            for b, s, resized, orig in zip(boxes, scores, batch.image_sizes, original_sizes)
        ]

    def _final_boxes(self, batch, features, proposals):
        """The second stage's detections (torchvision's ``RoIHeads`` in eval mode: per-class
        boxes, score floor, per-class NMS, its detections per image), then an NMS across its
        classes at ``nms_threshold`` and the best ``num_proposals``: ``(boxes, scores)`` per image."""
        heads = self.detector.roi_heads
        x = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        class_logits, deltas = heads.box_predictor(x)
        # fp32 decode and softmax, as in _refined_boxes: under bf16 autocast the decoded boxes
        # took the deltas' dtype (whole pixels lost past 256, 8 px steps past 1024).
        with torch.autocast(class_logits.device.type, enabled=False):
            boxes, scores, labels = heads.postprocess_detections(
                class_logits.float(), deltas.float(), [p.float() for p in proposals], batch.image_sizes)
        out_boxes, out_scores = [], []
        for b, s, lab in zip(boxes, scores, labels):
            keep = batched_nms(b, s, torch.zeros_like(lab), self.cfg.nms_threshold)
            keep = keep[: self.cfg.num_proposals]
            out_boxes.append(b[keep])
            out_scores.append(s[keep])
        return out_boxes, out_scores

    def _refined_boxes(self, batch, features, proposals):
        """Each proposal moved by the second stage's regression for its most likely object class
        (the one class of a class-agnostic head), clipped to its image."""
        heads = self.detector.roi_heads
        if not sum(len(p) for p in proposals):
            return proposals
        x = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        class_logits, deltas = heads.box_predictor(x)
        best = class_logits[:, 1:].argmax(dim=1) + 1
        deltas = deltas.view(len(x), -1, 4)[torch.arange(len(x), device=x.device), best]
        # fp32 decode: under bf16 autocast the deltas are bf16, and decode casts the boxes to their
        # dtype (8 mantissa bits: whole pixels lost past 256).
        moved = heads.box_coder.decode(deltas.float()[:, None], [p.float() for p in proposals])[:, 0]
        parts = moved.split([len(p) for p in proposals])
        return [clip_boxes_to_image(b, size) for b, size in zip(parts, batch.image_sizes)]

    def forward_train(
        self, images: list[torch.Tensor], targets: list[dict], objectness: str = "classify",
        regions: Callable[[list], tuple[list | None, list | None]] | None = None,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """One backbone + RPN pass that gives both the detector's training losses and the
        proposals a training step samples regions from.

        ``targets[i]["boxes"]`` are xyxy in the pixels of ``images[i]``; labels are ignored
        (every object is class 1). ``objectness`` picks the RPN's objectness loss (``classify``
        or ``centerness``, see ``_rpn_losses``). ``regions``, when given, is called with the
        proposals before any loss is taken and returns per image ``(ignore, positives)`` boxes
        in input pixels (either list may be None): ignore boxes take their anchors out of the
        RPN's negatives and their proposals out of the second stage's, positive boxes join the
        RPN's targets (caption pseudo-boxes: ``regionclip/objectness.py``).

        Returns ``(proposals, losses)``: proposals as ``forward`` gives them (RPN boxes with
        objectness, detached, in input pixels, for either ``source``: a training step samples
        from the RPN's candidates), losses including the box head's with ``source`` "final" or
        "refined" so it trains too.
        """
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        agnostic = [
            {"boxes": t["boxes"], "labels": torch.ones_like(t["labels"])} for t in targets
        ]
        batch, agnostic = self.detector.transform(images, agnostic)
        features = self.detector.backbone(batch.tensors)
        boxes, raw, head = self._rpn(batch, features)
        scores = [torch.sigmoid(r) for r in raw]
        proposals = [
            (resize_boxes(b, resized, orig), s)
            for b, s, resized, orig in zip(boxes, scores, batch.image_sizes, original_sizes)
        ]
        ignore, positives = regions(proposals) if regions is not None else (None, None)
        to_resized = [lambda b, r=resized, o=orig: resize_boxes(b.float(), o, r)
                      for resized, orig in zip(batch.image_sizes, original_sizes)]
        rpn_targets = agnostic
        if positives is not None:
            rpn_targets = []
            for t, extra, move in zip(agnostic, positives, to_resized):
                extra = move(extra).to(t["boxes"]) if extra is not None and len(extra) else t["boxes"][:0]
                rpn_targets.append({"boxes": torch.cat([t["boxes"], extra]),
                                    "labels": torch.ones(len(t["boxes"]) + len(extra), dtype=torch.int64,
                                                         device=t["boxes"].device)})
        if ignore is not None:
            ignore = [move(b) if b is not None and len(b) else None for b, move in zip(ignore, to_resized)]
        losses = self._rpn_losses(head, rpn_targets, objectness, ignore)
        if self.cfg.source != "rpn":
            kept = boxes
            if ignore is not None:
                # The second stage samples its own background from these: an ignore box's
                # proposals must not become its negatives either.
                kept = [b[~near_ignore(b, ig)] for b, ig in zip(boxes, ignore)]
            _, head_losses = self.detector.roi_heads(features, kept, batch.image_sizes, agnostic)
            # Named apart from the region box head's loss_box_reg (regionclip/box_head.py).
            losses = {**losses, **{f"loss_det_{k[5:]}": v for k, v in head_losses.items()}}
        return proposals, losses
