"""``RegionCLIPModel``: the stages as one ``nn.Module``, and nothing else.

``propose`` -> ``embed`` (-> ``refine`` with a box head) -> ``logits`` over one padded
``ImageBatch``; each stage's work lives in a module of its own (``proposals``, ``regions``,
``box_head``, ``text``, ``scoring``). The model owns the device and precision; ``save`` and
``from_checkpoint`` go through ``build``'s ``save_checkpoint`` / ``load_checkpoint``, the one home
of the checkpoint format. It does no image I/O, batching or postprocessing: that is the predictor's (``predictor.Predictor``), and ``RegionCLIP`` (``detector``) is the facade
that puts the two together.

Built for inference, the model's parameters do not require gradients, and the stages then run
under ``torch.inference_mode()`` themselves. Training marks what it trains
(``requires_grad_``), and the same stages record autograd.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import clip_boxes_to_image

from .batch import ImageBatch
from .box_head import BoxRefiner
from .build import checkpoint_config, load_parts, save_checkpoint
from .config import (ModelConfig, ScoringConfig, TextConfig, apply_overrides, check_scoring, from_dict,
                     list_model_presets, load_config, model_preset_path, to_dict, user_cache_dir)
from .distractors import check_spec
from .errors import BadConfig, BadInput, WeightsUnavailable
from .proposals import ProposalStage
from .regions import build_region_encoder
from .runtime import autocast_for, resolve_device
from .scoring import region_logits
from .text import ENSEMBLES, tokenizer_for


class RegionCLIPModel(nn.Module):
    """Faster R-CNN proposals, CLIP region embeddings, region-text logits: the stages, as tensors.

    Build it from arguments (``RegionCLIPModel(clip_model="RN50", mode="pool")``), from a
    ``ModelConfig``, by preset name / YAML path (``from_pretrained``) or from a checkpoint
    written by ``save`` (``from_checkpoint``).
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
        check_distractors(cfg.distractors)
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
        self.clip_key = parts.clip_key  # names the CLIP weights for on-disk embedding caches
        self.text = ENSEMBLES[cfg.text.ensemble](
            clip.encode_text, tokenizer_for(cfg.clip_model), cfg.text.templates,
            model_key=parts.clip_key, device=self.device, chunk_size=cfg.text.chunk_size,
            cache_dir=text_cache_dir(cfg.text, parts.clip_key),
        )
        # Built for inference: nothing records autograd until training marks what it trains.
        self.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":
            # Convolutions run fastest in NHWC on tensor cores; transformers are unaffected.
            self.proposals.detector.backbone.to(memory_format=torch.channels_last)
            if not hasattr(self.clip.visual, "transformer"):
                self.clip.visual.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------ build, save, load
    @classmethod
    def from_config(cls, cfg: ModelConfig):
        return cls(config=cfg)

    @classmethod
    def from_pretrained(cls, name_or_path: str, overrides: Sequence[str] = (), **kwargs):
        """Build from a preset in ``configs/models/`` (e.g. ``demo``, ``rn50``, ``vitb16``) or a YAML path.

        ``overrides`` are dotted ``key=value`` strings; keyword arguments set top-level fields.
        """
        return cls(config=resolve_model_config(name_or_path, overrides), **kwargs)

    def save(self, path: str | os.PathLike, half: bool = False, box_head: bool = True) -> None:
        """Write a self-contained checkpoint (config, CLIP architecture, state dicts) atomically;
        ``from_checkpoint`` reads it back. ``half`` stores floats as fp16; ``box_head=False`` leaves out the
        detector's second stage (``build.save_checkpoint``)."""
        save_checkpoint(self, path, half=half, box_head=box_head)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, overrides: Sequence[str] = (), **kwargs):
        """The model ``save`` wrote to ``path``, with its stored config (``overrides`` as in
        ``from_pretrained``; e.g. ``device="cpu"``)."""
        data = {**checkpoint_config(path), "checkpoint": str(Path(path).expanduser())}
        return cls(config=from_dict(ModelConfig, apply_overrides(data, list(overrides)), where=str(path)), **kwargs)

    # ----------------------------------------------------------------------------- properties
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
        t = self.proposals.detector.transform
        return input_max_side(self.cfg, (int(max(t.min_size)), int(t.max_size)))

    @property
    def refines_boxes(self) -> bool:
        return self.box_head is not None and self.cfg.regions.box_refinement

    @staticmethod
    def wants_logits(scoring: ScoringConfig) -> bool:
        """RegionCLIP's recipe multiplies by the raw RPN logit, not by its sigmoid."""
        return scoring.recipe == "regionclip" and scoring.objectness_weight > 0

    _wants_logits = wants_logits  # the name callers used before the split

    def _stage(self) -> contextlib.AbstractContextManager:
        """Inference mode unless something trains: a model whose parameters all stay frozen has
        no use for autograd, and tensors from ``encode_text`` (inference tensors) then mix freely."""
        if any(p.requires_grad for p in self.parameters()):
            return contextlib.nullcontext()
        return torch.inference_mode()

    # --------------------------------------------------------------------------------- stages
    def propose(self, batch: ImageBatch, logits: bool | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stage 1: per image, (K, 4) xyxy boxes in batch pixels (inside the image) and (K,)
        objectness: sigmoid probabilities, or the RPN's raw logits with ``logits`` (default: what
        the scoring recipe fuses, i.e. logits under ``scoring.recipe: regionclip`` with
        ``objectness_weight`` 0.5)."""
        logits = self.wants_logits(self.cfg.scoring) if logits is None else logits
        with self._stage():
            props = self.proposals(batch.images(), logits=logits)
            boxes = [clip_boxes_to_image(b.float(), size) for (b, _), size in zip(props, batch.sizes)]
            return boxes, [o.float() for _, o in props]

    def embed(self, batch: ImageBatch, boxes: Sequence[torch.Tensor], raw: bool = False) -> torch.Tensor:
        """Stage 2: (sum Ni, D) unit-norm region embeddings of ``boxes[i]`` (xyxy, batch pixels);
        ``raw=True`` gives the encoder's features before normalisation (what ``refine`` reads;
        ``logits`` normalises either)."""
        with self._stage():
            feats = self.regions(batch.images(), list(boxes))
            return feats if raw else F.normalize(feats, dim=-1)

    def refine(self, batch: ImageBatch, boxes: Sequence[torch.Tensor], raw: torch.Tensor) -> list[torch.Tensor]:
        """Stage 2b (models with a box head): per image, ``boxes[i]`` moved by the head's deltas
        read from their ``raw`` (sum Ni, D) features (``embed(..., raw=True)``), clipped to the image."""
        if self.box_head is None:
            raise BadConfig("this model has no box head to refine boxes with (regions.box_refinement)")
        with self._stage():
            parts = raw.split([len(b) for b in boxes])
            return [self.box_head.refine(f, b, size) for f, b, size in zip(parts, boxes, batch.sizes)]

    def logits(self, regions: torch.Tensor, text_emb: torch.Tensor, *, background: bool | None = None,
               scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Stage 3: the full (N, L [+ 1]) matrix, background column last when ``background``
        (default: the scoring config's; the model's learned background embedding when it has one,
        else a zero one); ``scale`` defaults to the model's logit scale."""
        bg = self.cfg.scoring.background if background is None else background
        with self._stage():
            return region_logits(regions, text_emb, self.logit_scale if scale is None else scale, bg,
                                 self.background_embedding)

    @torch.inference_mode()
    def encode_text(self, labels: Sequence[str]) -> torch.Tensor:
        """(L, D) unit-norm label embeddings (cached)."""
        with self.autocast():
            return self.text(labels)


def text_cache_dir(text: TextConfig, clip_key: str) -> str | Path | None:
    """Where the text encoder keeps embeddings between runs: ``text.cache_dir``, else the user's
    cache (a preset's 65 names x 81 RegionCLIP prompts cost minutes to encode on a CPU, every call).
    ``text.disk_cache: false`` keeps them in memory only, as does randomly initialised weights'
    default (their key is new at every build: files nobody reads again)."""
    if not text.disk_cache:
        return None
    if text.cache_dir:
        return text.cache_dir
    return None if "/random/" in clip_key else user_cache_dir()


def input_max_side(cfg: ModelConfig, detector_sides: tuple[int, int] | None = None) -> int | None:
    """``RegionCLIPModel.input_max_side`` of a model of ``cfg`` whose detector resizes to
    ``detector_sides`` (its transform's min and max size), before it is built: the sides come from
    ``cfg.proposals`` when it sets both. Raises ``LookupError`` when only the built detector knows
    them (its builder's defaults)."""
    if cfg.input_max_side is not None:
        return cfg.input_max_side if cfg.input_max_side > 0 else None
    if detector_sides is None:
        if cfg.proposals.min_size is None or cfg.proposals.max_size is None:
            raise LookupError("the detector's sizes are its builder's defaults: build the model to know them")
        detector_sides = (cfg.proposals.min_size, cfg.proposals.max_size)
    side = max(int(s) for s in detector_sides)
    if cfg.mode == "pool":
        return max(side, cfg.regions.pool_max_side)
    return 2 * side


def check_distractors(spec) -> None:
    """A model config's ``distractors`` that names no source is a ``BadConfig``, before any weights load."""
    try:
        check_spec(spec)
    except BadInput as exc:
        raise BadConfig(f"model {exc}") from None


def resolve_model_config(name_or_path: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """A preset name (``configs/models/NAME.yaml``) or a YAML path -> ``ModelConfig``."""
    path = preset = model_preset_path(name_or_path)
    if path is None:
        path = Path(name_or_path)
        if not path.is_file():
            presets = list_model_presets()
            if not presets:  # presets are read from the checkout, which a plain `pip install .` leaves behind
                from .config import configs_dir

                raise BadConfig(f"unknown model '{name_or_path}': no presets found ({configs_dir() / 'models'} is "
                                "missing): regionclip was installed without its checkout; install it with "
                                "pip install -e . from the repository, or pass a model YAML path")
            raise BadConfig(f"unknown model '{name_or_path}': use a preset ({', '.join(presets)}) or a YAML path")
    cfg = load_config(ModelConfig, path, overrides)
    if cfg.checkpoint and cfg.checkpoint.startswith("~"):
        cfg.checkpoint = str(Path(cfg.checkpoint).expanduser())
    if preset is not None and cfg.checkpoint and not Path(cfg.checkpoint).is_absolute():
        # Preset checkpoints are relative to the repository root; a user's YAML to the working folder.
        cfg.checkpoint = str((Path(__file__).resolve().parent.parent / cfg.checkpoint))
    return cfg
