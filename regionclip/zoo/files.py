"""Reading RegionCLIP's released files and telling them apart by their keys.

RegionCLIP (microsoft/RegionCLIP, ``docs/MODEL_ZOO.md``) ships plain detectron2 files:
``torch.save({"model": state_dict, ...})`` checkpoints for the models and RPNs, and bare
``(N, D)`` tensors for the concept embeddings. Every file is read with ``weights_only=True``; a
file of the wrong kind raises ``WeightsUnavailable`` with one line saying what it is and what
was expected.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..detectron2_rpn import missing_keys_error  # noqa: F401 (re-exported)
from ..errors import WeightsUnavailable

# detect_kind() results, with the words used in error messages.
KINDS = {
    "regionclip-pretrained": "a RegionCLIP pretrained model (regionclip_pretrained-cc_*.pth)",
    "regionclip-finetuned": "a RegionCLIP fine-tuned detector (regionclip_finetuned-{coco,lvis}_*.pth)",
    "rpn": "a detectron2 RPN / Mask R-CNN checkpoint (rpn_*.pth)",
    "concept-embeddings": "a concept-embedding tensor (*_cls_emb*.pth)",
    "regionclip-checkpoint": "a checkpoint written by this toolkit (RegionCLIP.save / regionclip import)",
    "open_clip": "an open_clip / OpenAI CLIP state dict (visual.*, transformer.*)",
    "torchvision-detector": "a torchvision Faster R-CNN state dict (backbone.body.*, rpn.head.*)",
    "detectron2": "a detectron2 checkpoint of another model",
    "unknown": "not a checkpoint this importer knows",
}
EXPECTED = {
    "regionclip-pretrained": "regionclip_pretrained-cc_rn50.pth / _rn50x4.pth",
    "regionclip-finetuned": "regionclip_finetuned-coco_rn50.pth (or lvis, rn50x4)",
    "rpn": "rpn_lvis_866.pth (R50-FPN) or rpn_coco_48.pth (R50-C4)",
    "concept-embeddings": "coco_65_cls_emb.pth or lvis_1203_cls_emb.pth (an (N, D) tensor)",
    "open_clip": "open_clip's RN50-quickgelu / RN50x4-quickgelu 'openai' weights",
}


def unwrap(obj: Any) -> Any:
    """detectron2 checkpoints hold the weights under ``"model"``; anything else is returned as is."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "format" not in obj:
        return obj["model"]
    return obj


def read_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, unwrapped, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a pickled object
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(
            f"{path}: holds pickled Python objects that weights_only=True refuses ({first}); "
            "if you trust the file, re-save only its weights: "
            "torch.save(torch.load(p, weights_only=False)['model'], 'weights.pth')"
        ) from None
    except Exception as exc:
        raise WeightsUnavailable(
            f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}; truncated or corrupt "
            "download?): download it again"
        ) from None
    return unwrap(obj)


def _has(state: dict, *keys: str) -> bool:
    return all(k in state for k in keys)


def detect_kind(obj: Any) -> str:
    """What a loaded file is, from its keys (see ``KINDS``).

    ``obj`` is what ``read_file`` returns: a state dict (detectron2's ``"model"`` already
    unwrapped) or a tensor.
    """
    if isinstance(obj, torch.Tensor):
        return "concept-embeddings" if obj.is_floating_point() and obj.ndim in (1, 2) else "unknown"
    if not isinstance(obj, dict) or not obj:
        return "unknown"
    if obj.get("format") == "regionclip/1":
        return "regionclip-checkpoint"
    if isinstance(obj.get("state_dict"), dict):  # open_clip / Lightning training checkpoints
        inner = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
        return detect_kind(inner)
    if not all(isinstance(k, str) for k in obj):
        return "unknown"
    if _has(obj, "backbone.attnpool.c_proj.weight", "backbone.layer1.0.conv1.weight"):
        if "roi_heads.box_predictor.cls_score.weight" in obj:
            return "regionclip-finetuned"
        return "regionclip-pretrained"
    if "proposal_generator.rpn_head.objectness_logits.weight" in obj:
        return "rpn"
    if _has(obj, "rpn.head.cls_logits.weight") or any(k.startswith("backbone.body.") for k in obj):
        return "torchvision-detector"
    if any(k.startswith(("visual.", "transformer.resblocks.")) for k in obj) or "token_embedding.weight" in obj:
        return "open_clip"
    if any(k.startswith(("backbone.", "proposal_generator.", "roi_heads.")) for k in obj):
        return "detectron2"
    return "unknown"


def expect(obj: Any, path: str | os.PathLike, *kinds: str) -> str:
    """Return ``detect_kind(obj)`` if it is one of ``kinds``; else raise one line naming both."""
    kind = detect_kind(obj)
    if kind in kinds:
        return kind
    wanted = " or ".join(f"{KINDS[k].split(' (')[0]} ({EXPECTED.get(k, k)})" for k in kinds)
    raise WeightsUnavailable(f"{path}: this is {KINDS[kind]}, expected {wanted}")
