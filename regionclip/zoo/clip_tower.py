"""RegionCLIP's CLIP towers -> an open_clip CLIP state dict.

Image tower: RegionCLIP's detectron2 ``ModifiedResNet`` (``detectron2/modeling/backbone/
clip_backbone.py``) keeps OpenAI CLIP's module names under ``backbone.``
(``backbone.layer4.2.bn3.running_var``, ``backbone.attnpool.c_proj.weight``), with detectron2
``FrozenBatchNorm2d`` buffers (weight, bias, running_mean, running_var; eps 1e-5; no
``num_batches_tracked``). Eval-mode ``nn.BatchNorm2d`` (eps 1e-5) computes the same function.

Text tower: ``CLIPLangEncoder`` under ``lang_encoder.`` with OpenAI's top-level names
(``transformer.resblocks.*``, ``token_embedding``, ``positional_embedding``, ``ln_final``,
``text_projection``) and no ``logit_scale``. Pretraining froze it (``PretrainFastRCNN``), and
fine-tuned detectors were trained without one (``CLIPFastRCNN`` builds it only to extract
concept embeddings), so a fine-tuned file holds no text tower: take it from the pretrained file.

Both towers use QuickGELU, so the open_clip target is ``RN50-quickgelu`` / ``RN50x4-quickgelu``:
the same names and shapes as ``RN50`` / ``RN50x4``, whose text MLP uses ``nn.GELU`` instead.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os

import open_clip
import torch
from torch import nn

from ..errors import BadConfig, WeightsUnavailable
from .files import missing_keys_error

IMAGE_PREFIX = "backbone."
TEXT_PREFIX = "lang_encoder."
# Copies of other networks inside RegionCLIP files; never part of the CLIP towers.
IGNORED_PREFIXES = ("teacher_backbone.", "offline_backbone.", "offline_proposal_generator.", "roi_heads.")
# RegionCLIP scores with cosine / MODEL.CLIP.CLSS_TEMP (0.01); stored as open_clip's log scale.
LOGIT_SCALE = 100.0
_TEXT_TOP = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def image_tower(state: dict) -> dict:
    """RegionCLIP state dict -> its image tower with OpenAI names (``conv1.weight``, ``attnpool.*``)."""
    return {k[len(IMAGE_PREFIX):]: v for k, v in state.items() if k.startswith(IMAGE_PREFIX)}


def text_tower(state: dict) -> dict | None:
    """The text tower with OpenAI names, from ``lang_encoder.*`` or an open_clip/OpenAI state dict.

    None when the file holds none (fine-tuned RegionCLIP detectors).
    """
    text = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    if not text:
        text = {k: v for k, v in state.items() if k.startswith(_TEXT_TOP)}
    text.pop("logit_scale", None)
    return text or None


def clip_config_from_state(image: dict, text: dict, where: str = "checkpoint") -> dict:
    """An open_clip model config (ModifiedResNet + text transformer, QuickGELU) from tensor shapes."""
    try:
        layers = [len({k.split(".")[1] for k in image if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        positions = image["attnpool.positional_embedding"].shape[0]
        width = text["ln_final.weight"].shape[0]
        config = {
            "embed_dim": int(image["attnpool.c_proj.weight"].shape[0]),
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": math.isqrt(positions - 1) * 32,
                "layers": layers,
                "width": int(image["layer1.0.conv1.weight"].shape[0]),
                "patch_size": None,
            },
            "text_cfg": {
                "context_length": int(text["positional_embedding"].shape[0]),
                "vocab_size": int(text["token_embedding.weight"].shape[0]),
                "width": int(width),
                "heads": max(1, int(width) // 64),  # OpenAI's rule (RN50: 8, RN50x4: 10)
                "layers": len({k.split(".")[2] for k in text if k.startswith("transformer.resblocks.")}),
            },
        }
    except KeyError as exc:
        name = exc.args[0]
        full = (IMAGE_PREFIX if name.startswith(("attnpool", "layer")) else TEXT_PREFIX) + name
        raise missing_keys_error(where, "the CLIP tower", [full]) from None
    if 0 in layers:
        raise missing_keys_error(where, "the CLIP image tower", [f"{IMAGE_PREFIX}layer{layers.index(0) + 1}.0.*"])
    return config


def _signature(config: dict) -> tuple | None:
    v, t = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if not isinstance(v.get("layers"), (list, tuple)) or "hf_model_name" in t or v.get("timm_model_name"):
        return None
    size = v.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    return (config.get("embed_dim"), tuple(v["layers"]), v.get("width", 64), size,
            t.get("width", 512), t.get("layers", 12), t.get("context_length", 77), t.get("vocab_size", 49408))


def find_clip_model(config: dict) -> str | None:
    """The registered open_clip name with these shapes and QuickGELU (``RN50-quickgelu`` ...), or None."""
    wanted = _signature(config)
    for name in open_clip.list_models():
        known = open_clip.get_model_config(name) or {}
        if known.get("quick_gelu") and _signature(known) == wanted:
            return name
    return None


def clip_model_name(config: dict) -> str:
    """``find_clip_model`` or a stable generated name for an architecture open_clip lacks."""
    name = find_clip_model(config)
    if name is None:
        digest = hashlib.sha256(repr(_signature(config)).encode()).hexdigest()[:8]
        name = f"regionclip-rn-{config['embed_dim']}-{digest}"
    return name


def convert_clip(state: dict, text_state: dict | None = None, where: str = "checkpoint") -> tuple[dict, dict]:
    """RegionCLIP state dict -> ``(open_clip CLIP state dict, open_clip config)``.

    ``state``: a RegionCLIP model file's weights (``backbone.*``, optionally ``lang_encoder.*``;
    ``teacher_backbone.*`` / ``offline_*`` / ``roi_heads.*`` are ignored). ``text_state``: where the
    text tower comes from when ``state`` has none (a pretrained RegionCLIP file or an open_clip
    RN50 state dict). The result has ``visual.*`` (with ``num_batches_tracked`` added), the text
    keys, and ``logit_scale`` = log(100), RegionCLIP's fixed temperature.
    """
    image = image_tower(state)
    if not image:
        raise missing_keys_error(where, "the CLIP image tower", [f"{IMAGE_PREFIX}conv1.weight"])
    text = text_tower(state) or (text_tower(text_state) if text_state is not None else None)
    if text is None:
        raise WeightsUnavailable(
            f"{where}: holds no text tower (fine-tuned RegionCLIP files don't): pass the pretrained "
            "file regionclip_pretrained-cc_rn50.pth (rn50x4 for RN50x4) as the text source"
        )
    config = clip_config_from_state(image, text, where)
    out: dict[str, torch.Tensor] = {}
    for key, value in image.items():
        out[f"visual.{key}"] = value
        if key.endswith(".running_mean"):  # FrozenBN has no counter; nn.BatchNorm2d wants one
            out[f"visual.{key[:-len('running_mean')]}num_batches_tracked"] = torch.tensor(0)
    out.update(text)
    out["logit_scale"] = torch.tensor(math.log(LOGIT_SCALE))
    return out, config


def create_clip(name: str) -> nn.Module:
    """``open_clip.create_model(name, pretrained=None)`` without its random-init warning."""
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)


def _regionclip_name(key: str) -> str:
    if key.startswith("visual."):
        return IMAGE_PREFIX + key[len("visual."):]
    return TEXT_PREFIX + key


def build_clip(name: str, clip_state: dict, where: str | os.PathLike = "checkpoint") -> nn.Module:
    """Build open_clip ``name`` and load a ``convert_clip`` state dict into it (every key must fit)."""
    known = open_clip.get_model_config(name) or {}
    if not known.get("quick_gelu"):
        raise BadConfig(
            f"CLIP {name} uses nn.GELU in its text tower; RegionCLIP's (OpenAI's) uses QuickGELU: "
            f"use {name}-quickgelu"
        )
    model = create_clip(name)
    try:
        result = model.load_state_dict(clip_state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:200])
        raise WeightsUnavailable(f"{where}: the CLIP towers do not fit open_clip {name}: {first}") from None
    missing = [_regionclip_name(k) for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise missing_keys_error(where, f"the CLIP towers ({name})", missing)
    if result.unexpected_keys:
        raise WeightsUnavailable(
            f"{where}: unexpected CLIP weights for open_clip {name} "
            f"(e.g. {_regionclip_name(result.unexpected_keys[0])}): not a RegionCLIP ResNet checkpoint"
        )
    return model.eval()
