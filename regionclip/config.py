"""Configs: YAML files read into plain nested dataclasses, with dotted ``key=value`` overrides.

An unknown key raises ``BadConfig`` naming the closest known key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import BadConfig

T = TypeVar("T")

# Detection-oriented prompts: region crops are small, partial and off-centre, so the
# templates talk about objects in a scene rather than about whole photos.
DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of part of a {}.",
    "there is a {} in the scene.",
    "a {} in the scene.",
    "an image of a {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
]


@dataclass
class ProposalConfig:
    # rpn: RPN boxes with objectness; refined: the same, moved by the detector's second-stage box
    # regression; final: box-head output merged across classes, scored by its classifier.
    source: str = "rpn"
    num_proposals: int = 300  # kept per image after the RPN's NMS; the main cost driver of region stages
    pre_nms_top_n: int = 1000  # per feature level, before the RPN's NMS
    nms_threshold: float = 0.7
    min_size: int | None = None  # detector input short side; None keeps the builder's (800, or 320 for *_320_fpn)
    max_size: int | None = None
    # Multiplies every RPN anchor size (torchvision: 32..512 px). 0.5 suits small objects at native
    # resolution, far cheaper than upsampling the image; the anchor count, so the weights, is unchanged.
    anchor_scale: float = 1.0
    # Width of the detector's second stage (two FC layers + predictor) when it is built untrained;
    # None: torchvision's 1024 (12.8M weights on a MobileNet FPN). A checkpoint's own width wins.
    box_head_width: int | None = None
    # Proposals below this objectness are dropped before NMS; None keeps the builder's (0.05 for
    # torchvision's *_320_fpn, else 0). A floor cuts what the RPN learned to doubt: unlabelled
    # kinds of object first (the demo on shapes val, novel recall@100 at IoU 0.5: 78.9% with
    # 0.05, 95.7% with 0; base 96.7 / 97.9).
    score_threshold: float | None = None


@dataclass
class RegionConfig:
    crop_scale: float = 1.5  # context around each box in crop mode; RegionCLIP-style crops see some scene
    crop_batch_size: int = 256  # crops through the image tower at once
    pool_short_side: int = 800  # dense-pass resolution in pool mode
    pool_max_side: int = 1333
    pool_variant: str = "regionclip"  # ResNet pool: regionclip (layer4 per region) | fast (layer4 once)
    # Move each proposal by the model's box head (class-agnostic deltas read from the raw region
    # feature; regionclip/box_head.py). Needs a checkpoint that holds one (RegionCLIP's fine-tuned
    # detectors do); given boxes are never moved.
    box_refinement: bool = False


@dataclass
class TextConfig:
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    # How template embeddings become one label embedding. normalized: normalise each, average,
    # renormalise (CLIP's zero-shot recipe). regionclip: average the raw features, then normalise,
    # with RegionCLIP's name clean-up (',' dropped, '+' read as ' '), as its concept files were made.
    ensemble: str = "normalized"
    chunk_size: int = 512  # prompts per text-tower batch; bounds memory for long vocabularies
    # Where label embeddings are kept on disk, keyed by the weights and templates. None: the user's
    # cache (``user_cache_dir``) for weights read from a file; random weights are never cached.
    cache_dir: str | None = None
    # false keeps embeddings in memory only (a read-only home, or a one-off run)
    disk_cache: bool = True


@dataclass
class ScoringConfig:
    logit_scale: float | None = 100.0  # None uses the CLIP model's learned scale
    background: bool = False  # add a zero embedding as an extra "nothing here" class
    objectness_weight: float = 0.5  # geometric-mean weight of RPN objectness; 0.5 is RegionCLIP's sqrt
    score_threshold: float = 0.05
    nms_iou: float = 0.5  # per-class NMS
    # A second, label-blind NMS at agnostic_nms_iou: one box per object, whatever label won.
    # On for display (`detect`); eval turns it off, since COCO mAP wants each label's own ranking.
    agnostic_nms: bool = True
    agnostic_nms_iou: float = 0.7
    max_detections: int = 100
    top_k: int = 1  # labels kept per box; mAP evaluation wants more than one
    # default: the steps above. regionclip: RegionCLIP's test-time inference (fast_rcnn.py): softmax
    # with the background column, sqrt(p * raw RPN logit) when objectness_weight is 0.5, every
    # (box, label) pair scoring above score_threshold (top_k and the agnostic NMS unused), per-label
    # NMS, max_detections. Needs background: true.
    recipe: str = "default"
    # Gaussian soft-NMS (sigma 0.5, pruned below 0.001: RegionCLIP's settings) instead of per-label
    # NMS; RegionCLIP evaluates its fine-tuned detectors with it. regionclip recipe only.
    soft_nms: bool = False
    # Calibration's collection only (``calibrate.collect``): boxes whose best match is a negative or
    # a distractor come back too, their label ids past the vocabulary's, so that the fit can replay
    # how they suppress listed boxes in the label-blind NMS. Never for output.
    report_extra: bool = False


RECIPES = ("default", "regionclip")


def check_scoring(cfg: ScoringConfig) -> ScoringConfig:
    """Raise ``BadConfig`` for values no scoring can use; returns ``cfg`` unchanged.

    Messages name the config field (``score_threshold``), not a command-line flag: the CLI
    and the Python API share them.
    """
    for name in ("score_threshold", "nms_iou", "agnostic_nms_iou", "objectness_weight"):
        value = getattr(cfg, name)
        if not 0.0 <= float(value) <= 1.0:
            raise BadConfig(f"{name} must be in [0, 1], but got {value}")
    for name in ("max_detections", "top_k"):
        if int(getattr(cfg, name)) < 1:
            raise BadConfig(f"{name} must be at least 1, but got {getattr(cfg, name)}")
    if cfg.logit_scale is not None and not float(cfg.logit_scale) > 0:
        raise BadConfig(f"logit_scale must be positive (or null for the learned one), but got {cfg.logit_scale}")
    if cfg.recipe not in RECIPES:
        raise BadConfig(f"unknown scoring recipe '{cfg.recipe}': use {' or '.join(RECIPES)}")
    if cfg.recipe == "regionclip":
        if not cfg.background:
            raise BadConfig("the regionclip recipe scores a background class: set scoring.background=true")
        if float(cfg.objectness_weight) not in (0.0, 0.5):
            raise BadConfig("the regionclip recipe multiplies by the RPN logit or not: objectness_weight must be "
                            f"0.5 (RegionCLIP's MULTIPLY_RPN_SCORE) or 0, but got {cfg.objectness_weight}")
    elif cfg.soft_nms:
        raise BadConfig("soft_nms is part of the regionclip recipe: set scoring.recipe=regionclip or soft_nms=false")
    return cfg


@dataclass
class ModelConfig:
    name: str = "custom"
    clip_model: str = "ViT-B-16"  # any open_clip architecture name
    clip_pretrained: str = "openai"  # open_clip tag, local checkpoint path, or "none" (random init)
    detector: str = "fasterrcnn_resnet50_fpn_v2"  # torchvision Faster R-CNN builder name
    detector_weights: str = "coco"  # "coco", local checkpoint path, or "none"
    checkpoint: str | None = None  # a regionclip checkpoint (CLIP + detector) overriding both
    mode: str = "crop"  # crop | pool
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # Longest image side decoded; larger images are reduced on decoding (JPEG draft mode), boxes
    # still come back in original pixels. None: what the stages use (detector / pool max side,
    # twice that in crop mode); 0: never reduce.
    input_max_side: int | None = None
    # The model's own vocabulary, for `detect` without --labels (a model trained on a closed set,
    # such as the demo's 12 shapes); empty: labels must be given.
    labels: list[str] = field(default_factory=list)
    # Names scored beside every vocabulary and never reported (regionclip/distractors.py), so that
    # with a short list an unlisted object is not given the nearest listed name: "labels" (the
    # names above: a closed-set model's own world), "common" (the shipped common-object names, for
    # CLIP presets), a text file, a list of names; none (null) scores the listed names alone.
    distractors: str | list[str] | None = None
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    regions: RegionConfig = field(default_factory=RegionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (known: {', '.join(options)})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except BadConfig:
                continue
        raise BadConfig(f"{where}: {value!r} is not a valid {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BadConfig(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise BadConfig(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise BadConfig(f"{where}: expected true/false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    raise BadConfig(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in names:
            raise BadConfig(f"{where}: unknown key '{key}'{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise BadConfig(f"override '{item}' must look like key=value, e.g. optim.lr=3e-4")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise BadConfig(f"override '{item}': '{key}' is not a section")
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadConfig(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BadConfig(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadConfig(f"{path}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read YAML ``path`` (or defaults) into ``cls``, then apply dotted ``overrides``."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return from_dict(cls, data, where=str(path) if path else "config")


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (beside checkpoints and run outputs)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def user_cache_dir() -> Path:
    """Embeddings cached between runs: ``$REGIONCLIP_CACHE``, else ``$XDG_CACHE_HOME/regionclip``
    (``~/.cache/regionclip``)."""
    if os.environ.get("REGIONCLIP_CACHE"):
        return Path(os.environ["REGIONCLIP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "regionclip"


def configs_dir() -> Path:
    """The repository's ``configs/`` folder (installs are editable; see README)."""
    return Path(__file__).resolve().parent.parent / "configs"


def model_preset_path(name: str) -> Path | None:
    """``configs/models/NAME.yaml`` if it exists."""
    path = configs_dir() / "models" / f"{name}.yaml"
    return path if path.is_file() else None


# What `regionclip train` writes at the end of a run (OUT/preset.yaml, beside OUT/model.pt).
RUN_PRESET = "preset.yaml"


def run_preset_path(path: str | Path) -> Path | None:
    """``path/preset.yaml`` when ``path`` is a folder holding one (a finished training run), else None.

    ``--model runs/x`` means the model that run trained, as ``--model runs/x/preset.yaml`` does.
    """
    preset = Path(path) / RUN_PRESET
    return preset if Path(path).is_dir() and preset.is_file() else None


def list_model_presets() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))
