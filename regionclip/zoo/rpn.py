"""detectron2 RPN files (RegionCLIP's ``rpn_*.pth``) -> a torchvision Faster R-CNN proposal stage.

RegionCLIP proposes regions with a separate detectron2 detector (``MODEL.CLIP.BB_RPN_WEIGHTS``):
``rpn_lvis_866.pth`` is an R50-FPN (zero-shot inference and pretraining),
``rpn_coco_48.pth`` an R50-C4 (OV-COCO fine-tuning and its evaluation). Both are MSRA ResNets
with detectron2 conventions that torchvision's Faster R-CNN does not share; ``build_rpn_detector``
builds the torchvision model and ``apply_detectron2_convention`` patches the conventions that
differ (``regionclip/detectron2_rpn.py`` lists them: stride in the 1x1 conv, caffe BGR input,
detectron2's resize, unrounded anchors at nominal strides, FrozenBN, padding).
"""


from __future__ import annotations

import functools
import re

import torch

from ..detectron2_rpn import (CAFFE_MEAN_BGR, DETECTORS, LAYOUTS, Detectron2AnchorGenerator,  # noqa: F401 (re-exported)
                              Detectron2Transform, _build, RPN_DEFAULTS, apply_detectron2_convention,
                              build_rpn_detector)
from ..errors import WeightsUnavailable
from .files import missing_keys_error





def rpn_layout(state: dict, where: str = "checkpoint") -> tuple[str, str]:
    """``(layout, prefix)`` of the detectron2 detector in ``state``: ``"fpn"`` or ``"c4"``, and ``""``
    or ``"offline_"`` (RegionCLIP model files carry a copy of their RPN under ``offline_*``)."""
    for prefix in ("", "offline_"):
        if f"{prefix}proposal_generator.rpn_head.objectness_logits.weight" not in state:
            continue
        if f"{prefix}proposal_generator.rpn_head.conv.weight" not in state:
            raise WeightsUnavailable(
                f"{where}: an RPN head with stacked convs (the SyncBN large-scale-jitter RPN, "
                "rpn_lvis_866_lsj.pth) is not supported: use rpn_lvis_866.pth or rpn_coco_48.pth"
            )
        if f"{prefix}backbone.bottom_up.stem.conv1.weight" in state:
            return "fpn", prefix
        if f"{prefix}backbone.stem.conv1.weight" in state:
            return "c4", prefix
    raise WeightsUnavailable(
        f"{where}: no detectron2 R50-FPN or R50-C4 RPN in this file (no proposal_generator.rpn_head.*)")


def _d2_body_key(key: str) -> str | None:
    """torchvision ResNet body key -> detectron2 ResNet key (None for num_batches_tracked)."""
    if key.endswith("num_batches_tracked"):
        return None
    if key.startswith("conv1."):
        return "stem." + key
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[4:]
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
    if not m:
        raise KeyError(key)
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def detectron2_key(key: str, layout: str) -> str | None:
    """The detectron2 name of torchvision Faster R-CNN key ``key`` (None: not stored by detectron2)."""
    body = "backbone.bottom_up." if layout == "fpn" else "backbone."
    if key.startswith("backbone.body."):
        d2 = _d2_body_key(key[len("backbone.body."):])
        return None if d2 is None else body + d2
    m = re.fullmatch(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.0\.(weight|bias)", key)
    if m:
        kind = "lateral" if m.group(1) == "inner" else "output"
        return f"backbone.fpn_{kind}{int(m.group(2)) + 2}.{m.group(3)}"
    head = {"rpn.head.conv.0.0.": "conv.", "rpn.head.cls_logits.": "objectness_logits.",
            "rpn.head.bbox_pred.": "anchor_deltas."}
    for tv, d2 in head.items():
        if key.startswith(tv):
            return "proposal_generator.rpn_head." + d2 + key[len(tv):]
    raise KeyError(key)


def convert_rpn(state: dict, where: str = "checkpoint") -> tuple[dict, str]:
    """detectron2 RPN state dict -> ``(torchvision state dict of backbone + rpn, layout)``.

    Takes ``backbone.*`` + ``proposal_generator.*`` (an ``rpn_*.pth``) or their ``offline_*``
    copies (inside a RegionCLIP model file); ``roi_heads.*`` is ignored. The first conv's input
    channels are reversed (BGR -> RGB). Keys are those of ``build_rpn_detector(layout)``.
    """
    layout, prefix = rpn_layout(state, where)
    out, missing, used = {}, [], set()
    for key in _target_keys(layout):
        d2 = detectron2_key(key, layout)
        if d2 is None:
            continue
        d2 = prefix + d2
        if d2 not in state:
            missing.append(d2)
            continue
        used.add(d2)
        out[key] = state[d2]
    if missing:
        raise missing_keys_error(where, f"the detectron2 R50-{layout.upper()} RPN", missing)
    extra = [k for k in state if k.startswith((f"{prefix}backbone.", f"{prefix}proposal_generator."))
             and k not in used and not k.endswith("num_batches_tracked") and ".anchor_generator." not in k]
    if extra:
        raise WeightsUnavailable(
            f"{where}: unexpected RPN weights (e.g. {extra[0]}): not a plain FrozenBN R50-{layout.upper()} "
            "RPN (norm layers in the FPN or the RPN head are not supported)"
        )
    out["backbone.body.conv1.weight"] = out["backbone.body.conv1.weight"].flip(1).contiguous()  # BGR -> RGB
    return out, layout




@functools.lru_cache(maxsize=None)
def _target_keys(layout: str) -> tuple[str, ...]:
    """The backbone + rpn keys of ``build_rpn_detector(layout)`` (FrozenBN: no batch counters)."""
    with torch.device("meta"):  # names only: no memory, no initialisation
        model = apply_detectron2_convention(_build(layout), layout)
    return tuple(k for k in model.state_dict() if not k.startswith("roi_heads."))
