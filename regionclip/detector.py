"""``RegionCLIP``: proposals -> region embeddings -> text matching -> ``Detections``.

The composition root. It owns the device and precision; every stage is a module of its own
and callable alone (``proposals``, ``regions``, ``text``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
from torch import nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from . import weights as W
from .config import ModelConfig, ScoringConfig, from_dict, list_model_presets, load_config, model_preset_path, to_dict
from .detections import Detections
from .errors import BadConfig, BadInput, WeightsUnavailable
from .io import ImageSource, load_image, to_tensor
from .proposals import HEAD_PREFIXES, ProposalStage, build_detector
from .regions import build_region_encoder
from .runtime import autocast_for, resolve_device
from .text import TextEncoder, check_labels

CHECKPOINT_FORMAT = "regionclip/1"


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
    """Label boxes by region-text similarity.

    ``region_emb`` (N, D) and ``text_emb`` (L, D) are unit-norm; ``objectness`` (N,) in [0, 1]
    or None. Scores are softmax(scale * cosine) over the vocabulary (plus a zero "background"
    embedding when configured), fused with objectness as p^(1-w) * o^w. Each box keeps its
    top-k labels. With ``filter_boxes`` the score threshold, per-class NMS and max-detections
    apply; without it every box comes back with its k labels in input order.
    """
    logits = logit_scale * region_emb.float() @ text_emb.float().T
    if cfg.background:
        logits = torch.cat([logits, logits.new_zeros((len(logits), 1))], dim=1)
    probs = logits.softmax(dim=-1)[:, : len(text_emb)]
    if objectness is not None and cfg.objectness_weight > 0:
        w = cfg.objectness_weight
        probs = probs.pow(1 - w) * objectness.float().clamp(min=0)[:, None].pow(w)
    k = max(1, min(cfg.top_k, probs.shape[1]))
    scores, label_ids = probs.topk(k, dim=1)
    boxes = boxes_xyxy.float()[:, None].expand(-1, k, 4).reshape(-1, 4)
    scores, label_ids = scores.reshape(-1), label_ids.reshape(-1)
    if filter_boxes:
        keep = torch.nonzero(scores >= cfg.score_threshold).squeeze(1)
        boxes, scores, label_ids = boxes[keep], scores[keep], label_ids[keep]
        keep = batched_nms(boxes, scores, label_ids, cfg.nms_iou)[: cfg.max_detections]
        boxes, scores, label_ids = boxes[keep], scores[keep], label_ids[keep]
    return Detections(boxes, scores, label_ids, tuple(vocabulary))


class RegionCLIP(nn.Module):
    """Open-vocabulary detector: Faster R-CNN proposals, CLIP region embeddings, text matching.

    Build it from arguments (``RegionCLIP(clip_model="RN50", mode="pool")``), from a
    ``ModelConfig``, or by preset name / YAML path with ``from_pretrained``.
    """

    def __init__(
        self,
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
        detector: str | None = None,
        detector_weights: str | None = None,
        mode: str | None = None,
        *,
        config: ModelConfig | None = None,
        **overrides,
    ):
        super().__init__()
        given = dict(clip_model=clip_model, clip_pretrained=clip_pretrained, detector=detector,
                     detector_weights=detector_weights, mode=mode, **overrides)
        data = to_dict(config if config is not None else ModelConfig())
        for key, value in given.items():
            if value is None:
                continue
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}  # nested sections merge, e.g. text={"cache_dir": ...}
            else:
                data[key] = value
        self.cfg = cfg = from_dict(ModelConfig, data, where="model")
        self.device = resolve_device(cfg.device)
        self.autocast = autocast_for(cfg.precision, self.device)
        clip, detector_model, clip_key = self._load_parts(cfg)
        self.clip = clip
        self.proposals = ProposalStage(detector_model, cfg.proposals)
        self.regions = build_region_encoder(clip.visual, cfg.mode, cfg.regions)
        self.text = TextEncoder(
            clip.encode_text, open_clip.get_tokenizer(cfg.clip_model), cfg.text.templates,
            model_key=clip_key, device=self.device, chunk_size=cfg.text.chunk_size,
            cache_dir=cfg.text.cache_dir,
        )
        self.eval().to(self.device)

    # ----------------------------------------------------------------------------- building
    @staticmethod
    def _load_parts(cfg: ModelConfig):
        """Resolve every weight first (fast offline failure), then build."""
        if cfg.checkpoint:
            return RegionCLIP._load_checkpoint(cfg)
        clip_res = W.resolve_clip(cfg.clip_model, cfg.clip_pretrained)
        det_res = W.resolve_detector(cfg.detector, cfg.detector_weights)
        clip = _create_clip(cfg.clip_model)
        if clip_res.path is not None:
            try:
                open_clip.load_checkpoint(clip, str(clip_res.path), weights_only=True)
            except Exception as exc:
                W.load_state(clip_res.path)  # raises the clearer error when the file is no checkpoint
                raise WeightsUnavailable(
                    f"{clip_res.path} does not fit CLIP {cfg.clip_model} ({type(exc).__name__}): "
                    "pass a checkpoint of that architecture"
                ) from None
        return clip, build_detector(det_res), clip_res.key

    @staticmethod
    def _load_checkpoint(cfg: ModelConfig):
        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise WeightsUnavailable(f"regionclip checkpoint not found: {path}")
        ckpt = W.load_state(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise WeightsUnavailable(f"{path} is not a regionclip checkpoint (saved by RegionCLIP.save)")
        if cfg.clip_model not in open_clip.list_models():
            W.register_clip_config(cfg.clip_model, ckpt["clip_model_config"])
        clip = _create_clip(cfg.clip_model)
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["clip"].items()}
        clip.load_state_dict(state)
        det_state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["detector"].items()}
        detector = build_detector(W.Resolved(cfg.detector, "checkpoint", None), det_state)
        st = path.stat()
        return clip, detector, f"{cfg.clip_model}/{path.name}/{st.st_size}/{int(st.st_mtime)}"

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RegionCLIP:
        return cls(config=cfg)

    @classmethod
    def from_pretrained(cls, name_or_path: str, overrides: Sequence[str] = (), **kwargs) -> RegionCLIP:
        """Build from a preset in ``configs/models/`` (e.g. ``demo``, ``rn50``, ``vitb16``) or a YAML path.

        ``overrides`` are dotted ``key=value`` strings; keyword arguments set top-level fields.
        """
        cfg = resolve_model_config(name_or_path, overrides)
        return cls(config=cfg, **kwargs)

    def save(self, path: str | os.PathLike, half: bool = False, box_head: bool = True) -> None:
        """Write a self-contained checkpoint (config, CLIP architecture, both state dicts) atomically.

        ``half`` stores floats as fp16; ``box_head=False`` leaves out the detector's second stage,
        which ``proposals.source="rpn"`` never runs (on MobileNet detectors it is most of the file).
        """
        skip = () if box_head else HEAD_PREFIXES

        def state(module: nn.Module) -> dict:
            return {k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
                    for k, v in module.state_dict().items() if not k.startswith(skip)}

        cfg = to_dict(self.cfg)
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "config": cfg,
            "clip_model_config": open_clip.get_model_config(self.cfg.clip_model),
            "clip": state(self.clip),
            "detector": state(self.proposals.detector),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)

    # ---------------------------------------------------------------------------- inference
    @property
    def logit_scale(self) -> float:
        if self.cfg.scoring.logit_scale is not None:
            return float(self.cfg.scoring.logit_scale)
        return float(self.clip.logit_scale.exp().clamp(max=100))

    def _inputs(self, images: Sequence[ImageSource]) -> list[torch.Tensor]:
        """The one place where inputs move to the device."""
        return [to_tensor(load_image(img), self.device) for img in images]

    @torch.inference_mode()
    def encode_text(self, labels: Sequence[str]) -> torch.Tensor:
        """(L, D) unit-norm label embeddings (cached)."""
        with self.autocast():
            return self.text(labels)

    @torch.inference_mode()
    def encode_regions(self, image: ImageSource, boxes_xyxy) -> torch.Tensor:
        """(N, D) unit-norm embeddings of ``boxes_xyxy`` (N, 4) in pixels of ``image``."""
        (tensor,) = self._inputs([image])
        boxes = _check_boxes(boxes_xyxy, self.device)
        with self.autocast():
            return self.regions([tensor], [boxes])

    @torch.inference_mode()
    def detect(
        self,
        images: ImageSource | Sequence[ImageSource],
        labels: Sequence[str],
        boxes=None,
        *,
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        top_k: int | None = None,
        batch_size: int = 8,
    ) -> Detections | list[Detections]:
        """Detect ``labels`` in one image (returns ``Detections``) or a list (returns a list).

        Images: paths, PIL images, HxWx3 RGB arrays or tensors. ``boxes`` (N, 4 xyxy pixels,
        or a list of them for a list of images) skips the proposal stage: each given box is
        classified and returned with its top-k labels, in input order, unfiltered.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if boxes is not None:
            boxes = [boxes] if single else list(boxes)
            if len(boxes) != len(items):
                raise BadInput(f"got {len(items)} images but {len(boxes)} box lists")
            boxes = [_check_boxes(b, self.device) for b in boxes]
        labels = check_labels(labels)
        scoring = dataclasses.replace(
            self.cfg.scoring,
            **{k: v for k, v in dict(score_threshold=score_threshold, nms_iou=nms_iou,
                                     max_detections=max_detections, top_k=top_k).items() if v is not None},
        )
        text_emb = self.encode_text(labels)
        tensors = self._inputs(items)
        out: list[Detections | None] = [None] * len(items)
        # Equal-size images share a batch, so padding never changes an image's result.
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), max(1, batch_size)):
                chunk = idx[start:start + batch_size]
                given = [boxes[i] for i in chunk] if boxes is not None else None
                dets = self._detect_batch([tensors[i] for i in chunk], text_emb, labels, scoring, given)
                for i, d in zip(chunk, dets):
                    out[i] = d
        return out[0] if single else out

    def _detect_batch(self, tensors, text_emb, labels, scoring, given=None) -> list[Detections]:
        with self.autocast():
            if given is None:
                props = self.proposals(tensors)
                boxes = [clip_boxes_to_image(b.float(), t.shape[-2:]) for (b, _), t in zip(props, tensors)]
                objectness = [o.float() for _, o in props]
            else:
                boxes, objectness = given, [None] * len(given)
            emb = self.regions(tensors, boxes)
        return [
            score_regions(e, text_emb, b, o, scoring, self.logit_scale, labels, filter_boxes=given is None)
            for e, b, o in zip(emb.split([len(b) for b in boxes]), boxes, objectness)
        ]


def _create_clip(name: str) -> nn.Module:
    # open_clip logs a warning for every model built without weights; we load them ourselves.
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)


def _check_boxes(boxes, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(boxes, dtype=np.float32) if not isinstance(boxes, torch.Tensor) else boxes)
    if t.ndim != 2 or t.shape[1] != 4:
        raise BadInput(f"boxes must have shape (N, 4) as x1, y1, x2, y2, but got {tuple(t.shape)}")
    if len(t) and bool(((t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])).any()):
        raise BadInput("boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1")
    return t.float().to(device)


def resolve_model_config(name_or_path: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """A preset name (``configs/models/NAME.yaml``) or a YAML path -> ``ModelConfig``."""
    path = preset = model_preset_path(name_or_path)
    if path is None:
        path = Path(name_or_path)
        if not path.is_file():
            raise BadConfig(
                f"unknown model '{name_or_path}': use a preset ({', '.join(list_model_presets())}) or a YAML path"
            )
    cfg = load_config(ModelConfig, path, overrides)
    if preset is not None and cfg.checkpoint and not Path(cfg.checkpoint).is_absolute():
        # Preset checkpoints are relative to the repository root; a user's YAML to the working folder.
        cfg.checkpoint = str((Path(__file__).resolve().parent.parent / cfg.checkpoint))
    return cfg
