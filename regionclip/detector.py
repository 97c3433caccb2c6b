"""``RegionCLIP``: proposals -> region embeddings -> text matching -> ``Detections``.

The composition root. It owns the device and precision and runs four stages over one padded
``ImageBatch``: ``propose`` -> ``embed`` -> ``logits`` -> ``postprocess``, plus ``refine`` (box
refinement) between ``embed`` and ``logits`` when the model has a box head. ``detect``, ``eval``,
``bench`` and training call exactly these; each stage's work lives in a module of its own
(``proposals``, ``regions``, ``box_head``, ``text``, ``scoring``; building in ``build``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import clip_boxes_to_image

from . import zoo
from .batch import ImageBatch, aspect_groups
from .box_head import BoxRefiner
from .build import CHECKPOINT_FORMAT, load_parts, uses_quick_gelu
from .config import (ModelConfig, ScoringConfig, check_scoring, from_dict, list_model_presets, load_config,
                     model_preset_path, to_dict)
from .detections import Detections
from .errors import BadConfig, BadInput, WeightsUnavailable
from .io import ImageSource, LoadedImage, load_reduced
from .proposals import HEAD_PREFIXES, ProposalStage
from .regions import build_region_encoder
from .runtime import autocast_for, resolve_device
from .scoring import (probabilities, region_logits, score_regions, select,  # noqa: F401 (score_regions re-exported)
                      select_pairs)
from .text import TextEncoder, check_labels

ENSEMBLES = {"normalized": TextEncoder, "regionclip": zoo.RegionCLIPTextEncoder}


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
        check_scoring(cfg.scoring)
        if cfg.text.ensemble not in ENSEMBLES:
            raise BadConfig(f"unknown text ensemble '{cfg.text.ensemble}': use {' or '.join(ENSEMBLES)}")
        self.device = resolve_device(cfg.device)
        self.autocast = autocast_for(cfg.precision, self.device)
        parts = load_parts(cfg)
        self.clip = clip = parts.clip
        self.proposals = ProposalStage(parts.detector, cfg.proposals)
        self.regions = build_region_encoder(clip.visual, cfg.mode, cfg.regions)
        dim = self.regions.embed_dim()
        where = str(cfg.checkpoint or "model")
        # Box refinement (regions.box_refinement) and a learned background embedding: from the
        # checkpoint when it holds them (RegionCLIP's fine-tuned detectors), else none.
        self.box_head = BoxRefiner.from_state(parts.box_head, dim, where) if parts.box_head is not None else None
        if cfg.regions.box_refinement and self.box_head is None:
            raise BadConfig("regions.box_refinement is on but the model has no box head (imported RegionCLIP "
                            "fine-tuned checkpoints have one): set regions.box_refinement=false")
        if parts.background is not None and parts.background.numel() != dim:
            raise WeightsUnavailable(f"{where}: the background embedding has {parts.background.numel()} values, "
                                     f"the CLIP embeds to {dim}")
        self.register_buffer("background_embedding", parts.background, persistent=False)
        self.text = ENSEMBLES[cfg.text.ensemble](
            clip.encode_text, open_clip.get_tokenizer(cfg.clip_model), cfg.text.templates,
            model_key=parts.clip_key, device=self.device, chunk_size=cfg.text.chunk_size,
            cache_dir=cfg.text.cache_dir,
        )
        self.eval().to(self.device)
        if self.device.type == "cuda":
            # Convolutions run fastest in NHWC on tensor cores; transformers are unaffected.
            self.proposals.detector.backbone.to(memory_format=torch.channels_last)
            if not hasattr(self.clip.visual, "transformer"):
                self.clip.visual.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------------------- building
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

    @classmethod
    def from_onnx(cls, folder: str | os.PathLike, **kwargs):
        """An ONNX export (``regionclip export``, ``regionclip.onnx.export_onnx``) run with onnxruntime:
        a ``regionclip.onnx.OnnxDetector`` (``detect``, ``encode_text``, numpy ``predict``), not a
        ``RegionCLIP``. Keywords go to it (``device``, ``threads``, ``verify``)."""
        from .onnx import OnnxDetector

        return OnnxDetector(folder, **kwargs)

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
            "clip_model_config": self._clip_arch(),
            "clip": state(self.clip),
            "detector": state(self.proposals.detector),
        }
        if self.box_head is not None:
            ckpt["box_head"] = state(self.box_head)
        if self.background_embedding is not None:
            ckpt["background_embedding"] = self.background_embedding.detach().cpu()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)

    def _clip_arch(self) -> dict:
        """The open_clip config this model was built with (QuickGELU included when forced)."""
        arch = dict(open_clip.get_model_config(self.cfg.clip_model))
        if uses_quick_gelu(self.clip):
            arch["quick_gelu"] = True
        return arch

    # ---------------------------------------------------------------------------- inference
    @property
    def logit_scale(self) -> float:
        if self.cfg.scoring.logit_scale is not None:
            return float(self.cfg.scoring.logit_scale)
        return float(self.clip.logit_scale.detach().exp().clamp(max=100))  # a number: no graph to keep

    @property
    def input_max_side(self) -> int | None:
        """The longest image side any stage uses; larger inputs are reduced when decoded.

        The detector and the dense pool resize to at most their max side anyway. Crops cut from
        the decoded image, so crop mode keeps twice that for the detail of small boxes.
        """
        if self.cfg.input_max_side is not None:
            return self.cfg.input_max_side if self.cfg.input_max_side > 0 else None
        t = self.proposals.detector.transform
        side = max(int(t.max_size), int(max(t.min_size)))
        if self.cfg.mode == "pool":
            return max(side, self.cfg.regions.pool_max_side)
        return 2 * side

    def scoring_config(self, **overrides) -> ScoringConfig:
        """The model's scoring with the non-None ``overrides`` applied, checked."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            cfg = dataclasses.replace(self.cfg.scoring, **given)
        except TypeError as exc:
            raise BadInput(f"unknown scoring option: {exc}") from None
        return check_scoring(cfg)

    def load(self, images: Sequence[ImageSource]) -> list[LoadedImage]:
        """Decode images at the resolution the stages need (see ``input_max_side``)."""
        return [load_reduced(img, self.input_max_side) for img in images]

    def batch(self, loaded: Sequence[LoadedImage]) -> ImageBatch:
        """The one place where inputs move to the device."""
        return ImageBatch.from_loaded(loaded, self.device)

    @staticmethod
    def _wants_logits(scoring: ScoringConfig) -> bool:
        """RegionCLIP's recipe multiplies by the raw RPN logit, not by its sigmoid."""
        return scoring.recipe == "regionclip" and scoring.objectness_weight > 0

    @property
    def refines_boxes(self) -> bool:
        return self.box_head is not None and self.cfg.regions.box_refinement

    def propose(self, batch: ImageBatch, logits: bool | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stage 1: per image, (K, 4) xyxy boxes in batch pixels (inside the image) and (K,)
        objectness: sigmoid probabilities, or the RPN's raw logits with ``logits`` (default: what
        the scoring recipe fuses, i.e. logits under ``scoring.recipe: regionclip`` with
        ``objectness_weight`` 0.5)."""
        logits = self._wants_logits(self.cfg.scoring) if logits is None else logits
        props = self.proposals(batch.images(), logits=logits)
        boxes = [clip_boxes_to_image(b.float(), size) for (b, _), size in zip(props, batch.sizes)]
        return boxes, [o.float() for _, o in props]

    def embed(self, batch: ImageBatch, boxes: Sequence[torch.Tensor], raw: bool = False) -> torch.Tensor:
        """Stage 2: (sum Ni, D) unit-norm region embeddings of ``boxes[i]`` (xyxy, batch pixels);
        ``raw=True`` gives the encoder's features before normalisation (what ``refine`` reads;
        ``logits`` normalises either)."""
        feats = self.regions(batch.images(), list(boxes))
        return feats if raw else F.normalize(feats, dim=-1)

    def refine(self, batch: ImageBatch, boxes: Sequence[torch.Tensor], raw: torch.Tensor) -> list[torch.Tensor]:
        """Stage 2b (models with a box head): per image, ``boxes[i]`` moved by the head's deltas
        read from their ``raw`` (sum Ni, D) features (``embed(..., raw=True)``), clipped to the image."""
        if self.box_head is None:
            raise BadConfig("this model has no box head to refine boxes with (regions.box_refinement)")
        parts = raw.split([len(b) for b in boxes])
        return [self.box_head.refine(f, b, size) for f, b, size in zip(parts, boxes, batch.sizes)]

    def logits(self, regions: torch.Tensor, text_emb: torch.Tensor, *, background: bool | None = None,
               scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Stage 3: the full (N, L [+ 1]) matrix, background column last when ``background``
        (default: the scoring config's; the model's learned background embedding when it has one,
        else a zero one); ``scale`` defaults to the model's logit scale."""
        bg = self.cfg.scoring.background if background is None else background
        return region_logits(regions, text_emb, self.logit_scale if scale is None else scale, bg,
                             self.background_embedding)

    def postprocess(
        self,
        batch: ImageBatch,
        boxes: Sequence[torch.Tensor],
        objectness: Sequence[torch.Tensor | None],
        logits: torch.Tensor,
        labels: Sequence[str],
        scoring: ScoringConfig | None = None,
        filter_boxes: bool = True,
    ) -> list[Detections]:
        """Stage 4: scores, selection and NMS per image; boxes back in original-image pixels.
        ``filter_boxes=False`` keeps every box with its top-k labels (given boxes).

        ``scoring.recipe`` default: probabilities fused with objectness, top-k labels per box,
        threshold, NMS (``scoring.probabilities`` + ``select``). regionclip: RegionCLIP's inference,
        ``zoo.regionclip_scores`` (times the raw RPN logit when ``objectness`` holds logits, see
        ``propose``) + ``scoring.select_pairs``."""
        cfg = scoring or self.cfg.scoring
        out = []
        for i, (b, o, lg) in enumerate(zip(boxes, objectness, logits.split([len(b) for b in boxes]))):
            if cfg.recipe == "regionclip":
                fuse = o if (o is not None and self._wants_logits(cfg)) else None
                probs = zoo.regionclip_scores(lg.float().softmax(dim=-1), fuse)
                d = select_pairs(b, probs, cfg, labels) if filter_boxes else select(b, probs, cfg, labels, False)
            else:
                d = select(b, probabilities(lg, len(labels), o, cfg), cfg, labels, filter_boxes)
            out.append(Detections(batch.to_original(i, d.boxes_xyxy), d.scores, d.label_ids, d.vocabulary))
        return out

    def detect_batch(self, batch: ImageBatch, text_emb: torch.Tensor, labels: Sequence[str],
                     scoring: ScoringConfig | None = None,
                     boxes: Sequence[torch.Tensor] | None = None,
                     proposals_out: list | None = None) -> list[Detections]:
        """The stages over one batch; ``boxes`` (batch pixels) replace the proposals and are
        never refined. ``proposals_out`` (a list) receives each image's proposals as
        ``(boxes_xyxy in original pixels, objectness)``, what ``regionclip.recall`` measures."""
        scoring = scoring or self.cfg.scoring
        given = boxes is not None
        refine = self.refines_boxes and not given
        with self.autocast():
            if given:
                objectness = [None] * len(boxes)
            else:
                boxes, objectness = self.propose(batch, logits=self._wants_logits(scoring))
                if proposals_out is not None:
                    proposals_out += [(batch.to_original(i, b), o) for i, (b, o) in enumerate(zip(boxes, objectness))]
            regions = self.embed(batch, boxes, raw=refine)
            if refine:
                boxes = self.refine(batch, boxes, regions)
            logits = self.logits(regions, text_emb, background=scoring.background)
        return self.postprocess(batch, boxes, objectness, logits, labels, scoring, filter_boxes=not given)

    @torch.inference_mode()
    def encode_text(self, labels: Sequence[str]) -> torch.Tensor:
        """(L, D) unit-norm label embeddings (cached)."""
        with self.autocast():
            return self.text(labels)

    def vocabulary(self, labels: Sequence[str] | None, text_embeddings=None) -> tuple[list[str], torch.Tensor]:
        """``(labels, (L, D) unit-norm embeddings)``: ``labels`` encoded by the text tower, or, with
        ``text_embeddings`` (an (L, D) tensor or a RegionCLIP concept-embedding file such as
        ``coco_65_cls_emb.pth``), those rows, one per label in order (``labels`` None: named "0", "1", ...).
        A count or dimension that does not fit raises ``BadInput`` naming both."""
        if text_embeddings is None:
            if labels is None:
                raise BadInput("pass labels (a list of names) or text_embeddings (a tensor or concept-embedding file)")
            labels = check_labels(labels)
            return labels, self.encode_text(labels)
        emb = zoo.load_concept_embeddings(text_embeddings)
        labels = check_labels(labels) if labels is not None else [str(i) for i in range(len(emb))]
        where = "text embeddings" if isinstance(text_embeddings, torch.Tensor) else f"text embeddings {text_embeddings}"
        return labels, zoo.check_concept_embeddings(emb, labels, self.regions.embed_dim(), where).to(self.device)

    @torch.inference_mode()
    def encode_regions(self, image: ImageSource, boxes_xyxy) -> torch.Tensor:
        """(N, D) unit-norm embeddings of ``boxes_xyxy`` (N, 4) in pixels of ``image``."""
        batch = self.batch(self.load([image]))
        boxes = batch.to_batch(0, _check_boxes(boxes_xyxy, self.device))
        with self.autocast():
            return self.embed(batch, [boxes])

    @torch.inference_mode()
    def classify(self, images: Sequence[ImageSource], labels: Sequence[str] | None, boxes: Sequence,
                 batch_size: int = 8, *, text_embeddings=None) -> list[torch.Tensor]:
        """Per image, the (N, L) probability matrix of its given ``boxes`` (N, 4 xyxy, original
        pixels) over ``labels``: the GT-box protocol's input. No objectness, no filtering.
        ``text_embeddings``: see ``vocabulary``."""
        labels, text_emb = self.vocabulary(labels, text_embeddings)
        loaded = self.load(images)
        out: list[torch.Tensor | None] = [None] * len(loaded)
        for idx in aspect_groups([x.pixels.shape[:2] for x in loaded], _check_batch_size(batch_size)):
            batch = self.batch([loaded[i] for i in idx])
            given = [batch.to_batch(j, _check_boxes(boxes[i], self.device)) for j, i in enumerate(idx)]
            with self.autocast():
                logits = self.logits(self.embed(batch, given), text_emb)
            probs = probabilities(logits, len(labels), None, self.cfg.scoring)
            for i, p in zip(idx, probs.split([len(b) for b in given])):
                out[i] = p
        return out

    @torch.inference_mode()
    def detect(
        self,
        images: ImageSource | Sequence[ImageSource],
        labels: Sequence[str] | None = None,
        boxes=None,
        *,
        text_embeddings=None,
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        top_k: int | None = None,
        agnostic_nms: bool | None = None,
        batch_size: int = 8,
        proposals_out: list | None = None,
    ) -> Detections | list[Detections]:
        """Detect ``labels`` in one image (returns ``Detections``) or a list (returns a list).

        Images: paths, PIL images, HxWx3 RGB arrays or tensors. Images of any sizes share a
        padded batch (similar aspect ratios together). ``boxes`` (N, 4 xyxy pixels, or a list
        of them for a list of images) skips the proposal stage: each given box is classified
        and returned with its top-k labels, in input order, unfiltered. ``agnostic_nms``:
        suppress overlapping boxes across labels too (one box per object). ``text_embeddings``
        (a tensor or a concept-embedding file, one row per label) replaces encoding ``labels``
        (see ``vocabulary``). ``proposals_out`` (a list) receives each image's proposals, in
        input order, as ``detect_batch`` gives them.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        batch_size = _check_batch_size(batch_size)
        if boxes is not None:
            boxes = [boxes] if single else list(boxes)
            if len(boxes) != len(items):
                raise BadInput(f"got {len(items)} images but {len(boxes)} box lists")
            boxes = [_check_boxes(b, self.device) for b in boxes]
        scoring = self.scoring_config(score_threshold=score_threshold, nms_iou=nms_iou,
                                      max_detections=max_detections, top_k=top_k, agnostic_nms=agnostic_nms)
        labels, text_emb = self.vocabulary(labels, text_embeddings)
        loaded = self.load(items)
        out: list[Detections | None] = [None] * len(items)
        proposals: list = [None] * len(items)
        for idx in aspect_groups([x.pixels.shape[:2] for x in loaded], batch_size):
            batch = self.batch([loaded[i] for i in idx])
            given = [batch.to_batch(j, boxes[i]) for j, i in enumerate(idx)] if boxes is not None else None
            found: list | None = [] if proposals_out is not None and given is None else None
            for i, d in zip(idx, self.detect_batch(batch, text_emb, labels, scoring, given, found)):
                out[i] = d
            for i, p in zip(idx, found or []):
                proposals[i] = p
        if proposals_out is not None and boxes is None:
            proposals_out += proposals
        return out[0] if single else out


def _check_batch_size(batch_size) -> int:
    if int(batch_size) < 1:
        raise BadInput(f"batch_size must be at least 1, but got {batch_size}")
    return int(batch_size)


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
    if cfg.checkpoint and cfg.checkpoint.startswith("~"):
        cfg.checkpoint = str(Path(cfg.checkpoint).expanduser())
    if preset is not None and cfg.checkpoint and not Path(cfg.checkpoint).is_absolute():
        # Preset checkpoints are relative to the repository root; a user's YAML to the working folder.
        cfg.checkpoint = str((Path(__file__).resolve().parent.parent / cfg.checkpoint))
    return cfg
