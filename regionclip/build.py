"""A model's parts from a ``ModelConfig`` (resolve every weight first, then build), and its checkpoint:
``load_checkpoint`` and ``save_checkpoint`` side by side, so the format has one home.

Two sources: open_clip / torchvision weights named by the config (``clip_pretrained``,
``detector_weights``), or one regionclip checkpoint (``checkpoint``: written by
``RegionCLIP.save`` or by ``regionclip import`` from RegionCLIP's released files). A checkpoint
may carry a box head and a learned background embedding besides the two towers.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from . import weights as W
from .atomic import atomic_torch_save
from .detectron2_rpn import DETECTORS as DETECTRON2_DETECTORS
from .detectron2_rpn import build_rpn_detector
from .config import ModelConfig, to_dict
from .errors import BadConfig, WeightsUnavailable
from .proposals import HEAD_PREFIXES, build_detector
from .skip_init import skip_init

CHECKPOINT_FORMAT = "regionclip/1"
_IMPORT_HINT = ("convert RegionCLIP's released files first: regionclip import WEIGHTS RPN --out DIR "
                "(README: RegionCLIP's released models)")


@dataclass
class Parts:
    """What a model is built from. ``box_head``: a ``BoxRefiner`` state dict (``bbox_pred.*``) or
    None; ``background``: a learned (1, D) background embedding or None (the zero one)."""

    clip: nn.Module
    detector: nn.Module
    clip_key: str  # names the CLIP weights for the text-embedding cache
    box_head: dict[str, torch.Tensor] | None = None
    background: torch.Tensor | None = None


def load_parts(cfg: ModelConfig) -> Parts:
    """The CLIP model, the proposal detector and the extras for ``cfg`` (see ``Parts``)."""
    if cfg.checkpoint:
        return load_checkpoint(cfg)
    if cfg.detector in DETECTRON2_DETECTORS:
        raise BadConfig(f"detector {cfg.detector} is built from an imported RegionCLIP checkpoint: {_IMPORT_HINT}, "
                        "then use --model with the preset it writes (or set checkpoint=PATH)")
    clip_res = W.resolve_clip(cfg.clip_model, cfg.clip_pretrained)
    det_res = W.resolve_detector(cfg.detector, cfg.detector_weights)
    # OpenAI's CLIPs were trained with QuickGELU, which open_clip's plain names (RN50,
    # ViT-B-16) do not build: take the activation from the weights' tag.
    tag = W.pretrained_cfg(cfg.clip_model, cfg.clip_pretrained)
    # open_clip's strict load of a weights file replaces every weight: none is drawn first (its
    # big_vision .npz reader checks nothing, so those are built as usual).
    whole = clip_res.path is not None and Path(clip_res.path).suffix not in (".npz", ".npy")
    with skip_init() if whole else contextlib.nullcontext():
        clip = create_clip(cfg.clip_model, quick_gelu=bool(tag.get("quick_gelu")))
    if clip_res.path is not None:
        try:
            open_clip.load_checkpoint(clip, str(clip_res.path), weights_only=True)
        except Exception as exc:
            W.load_state(clip_res.path)  # raises the clearer error when the file is no checkpoint
            raise WeightsUnavailable(
                f"{clip_res.path} does not fit CLIP {cfg.clip_model} ({type(exc).__name__}): "
                "pass a checkpoint of that architecture"
            ) from None
    return Parts(clip, build_detector(det_res, head_width=cfg.proposals.box_head_width), clip_res.key)


def checkpoint_config(path: str | Path) -> dict:
    """The model config stored in a regionclip checkpoint (``save_checkpoint``), as a plain dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"regionclip checkpoint not found: {path}")
    ckpt = W.load_state(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise WeightsUnavailable(f"{path} is not a regionclip checkpoint (saved by RegionCLIP.save)")
    return dict(ckpt.get("config") or {})


def load_checkpoint(cfg: ModelConfig) -> Parts:
    """A regionclip checkpoint (``cfg.checkpoint``, ``~`` expanded) -> ``Parts``."""
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        hint = f": {_IMPORT_HINT}" if cfg.detector in DETECTRON2_DETECTORS else ""
        raise WeightsUnavailable(f"regionclip checkpoint not found: {path}{hint}")
    ckpt = W.load_state(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise WeightsUnavailable(f"{path} is not a regionclip checkpoint (saved by RegionCLIP.save)")
    arch = ckpt["clip_model_config"]
    known = open_clip.get_model_config(cfg.clip_model) if cfg.clip_model in open_clip.list_models() else None
    if known is None or _arch(known) != _arch(arch):
        # The checkpoint's own architecture wins: two checkpoints may use one name for different
        # shapes (the demo model's tiny CLIP before and after a retrain), in one process.
        W.register_clip_config(cfg.clip_model, {k: v for k, v in arch.items() if k != "quick_gelu"})
    with skip_init():  # the strict load below replaces every weight
        clip = create_clip(cfg.clip_model, quick_gelu=bool(arch.get("quick_gelu")))
    try:
        clip.load_state_dict(_float(ckpt["clip"]))
    except RuntimeError:
        stored = (ckpt.get("config") or {}).get("clip_model", "?")
        raise WeightsUnavailable(
            f"{path}: its CLIP weights do not fit {cfg.clip_model}: set clip_model to the checkpoint's ({stored})"
        ) from None
    det_state = _float(ckpt["detector"])
    layout = ckpt.get("detector_layout")
    if cfg.detector in DETECTRON2_DETECTORS:
        detector = build_rpn_detector(cfg.detector, det_state, where=str(path))
    elif layout is not None:
        raise BadConfig(f"{path} holds a detectron2 R50-{layout.upper()} RPN: set detector to "
                        f"{next(k for k, v in DETECTRON2_DETECTORS.items() if v == layout)}")
    else:
        detector = build_detector(W.Resolved(cfg.detector, "checkpoint", None), det_state,
                                  head_width=cfg.proposals.box_head_width)
    # Box head and background: stored by RegionCLIP.save, or RegionCLIP's fine-tuned predictor
    # as `regionclip import` keeps it (bbox_pred.*, cls_bg_score.weight).
    predictor = ckpt.get("box_predictor") or {}
    head = ckpt.get("box_head")
    if head is None and "bbox_pred.weight" in predictor:
        head = {k: predictor[k] for k in ("bbox_pred.weight", "bbox_pred.bias") if k in predictor}
    background = ckpt.get("background_embedding", predictor.get("cls_bg_score.weight"))
    st = path.stat()
    return Parts(clip, detector, f"{cfg.clip_model}/{path.name}/{st.st_size}/{int(st.st_mtime)}",
                 _float(head) if head is not None else None,
                 background.float() if background is not None else None)


def save_checkpoint(model: nn.Module, path: str | Path, half: bool = False, box_head: bool = True) -> Path:
    """Write ``model`` (a ``RegionCLIPModel``) as a self-contained checkpoint, atomically: config,
    CLIP architecture, both state dicts, and the box head and background embedding when it has them.

    ``half`` stores floats as fp16; ``box_head=False`` leaves out the detector's second stage,
    which ``proposals.source="rpn"`` never runs (on MobileNet detectors it is most of the file).
    """
    skip = () if box_head else HEAD_PREFIXES

    def state(module: nn.Module) -> dict:
        return {k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
                for k, v in module.state_dict().items() if not k.startswith(skip)}

    arch = dict(open_clip.get_model_config(model.cfg.clip_model))
    if uses_quick_gelu(model.clip):
        arch["quick_gelu"] = True
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": to_dict(model.cfg),
        "clip_model_config": arch,
        "clip": state(model.clip),
        "detector": state(model.proposals.detector),
    }
    if model.box_head is not None:
        ckpt["box_head"] = state(model.box_head)
    if model.background_embedding is not None:
        ckpt["background_embedding"] = model.background_embedding.detach().cpu()
    return atomic_torch_save(ckpt, path)


def _arch(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "quick_gelu"}


def _float(state: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def create_clip(name: str, quick_gelu: bool = False) -> nn.Module:
    # open_clip logs a warning for every model built without weights; we load them ourselves.
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        logging.disable(logging.NOTSET)


def uses_quick_gelu(clip: nn.Module) -> bool:
    return any(isinstance(m, open_clip.model.QuickGELU) for m in clip.modules())
