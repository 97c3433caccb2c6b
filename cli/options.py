"""Options shared by commands that build a model, and the one function that builds it."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional, Sequence

import typer

from regionclip import RegionCLIP
from regionclip.detector import resolve_model_config

Model = Annotated[str, typer.Option("--model", "-m", help="Preset in configs/models/ (demo, vitb16, rn50) or a model YAML path.")]
ClipModel = Annotated[Optional[str], typer.Option(help="open_clip architecture, e.g. ViT-B-16, RN50 (overrides the preset).")]
ClipPretrained = Annotated[Optional[str], typer.Option(help="open_clip pretrained tag (openai, laion2b_...), a local checkpoint path, or 'none' for random weights.")]
Detector = Annotated[Optional[str], typer.Option(help="torchvision builder: fasterrcnn_resnet50_fpn_v2, fasterrcnn_resnet50_fpn, fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn.")]
DetectorWeights = Annotated[Optional[str], typer.Option(help="'coco' (torchvision weights), a local checkpoint path, or 'none'.")]
Mode = Annotated[Optional[str], typer.Option(help="Region embeddings: 'crop' (RoIAlign crops through the tower) or 'pool' (one dense pass per image).")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (fp16 needs CUDA).")]
Set = Annotated[Optional[list[str]], typer.Option("--set", help="Dotted config override, e.g. --set proposals.num_proposals=100 (repeatable).")]
TextCache = Annotated[Optional[Path], typer.Option(help="Folder for the on-disk text-embedding cache.")]

DEFAULT_MODEL = "vitb16"


@dataclass
class ModelFlags:
    """The model options of one command line; None leaves the preset's value."""

    model: str = DEFAULT_MODEL
    clip_model: str | None = None
    clip_pretrained: str | None = None
    detector: str | None = None
    detector_weights: str | None = None
    mode: str | None = None
    device: str | None = None
    precision: str | None = None
    set_: list[str] | None = None
    text_cache: Path | None = None


_FLAG_TYPES = {"model": Model, "clip_model": ClipModel, "clip_pretrained": ClipPretrained, "detector": Detector,
               "detector_weights": DetectorWeights, "mode": Mode, "device": Device, "precision": Precision,
               "set_": Set, "text_cache": TextCache}


def with_model_flags(text_cache: bool = True) -> Callable[[Callable], Callable]:
    """Give a command the model options (typer reads the signature), passed to it as ``flags``.

    One list of options for every command that builds a model, so their names and help never
    drift apart; ``text_cache=False`` leaves out --text-cache where no text is cached.
    """
    names = [n for n in _FLAG_TYPES if text_cache or n != "text_cache"]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(**kwargs):
            flags = ModelFlags(**{n: kwargs.pop(n) for n in names})
            return command(**kwargs, flags=flags)

        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=_FLAG_TYPES[n],
                                   default=getattr(ModelFlags, n)) for n in names]
        wrapper.__signature__ = inspect.Signature(own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


def build_model(flags: ModelFlags, extra_sets: Sequence[str] = ()) -> RegionCLIP:
    """Preset + explicit flags -> model. Flags win over the preset."""
    sets = list(flags.set_ or []) + list(extra_sets)
    if flags.text_cache is not None:
        sets.append(f"text.cache_dir={flags.text_cache}")
    cfg = resolve_model_config(flags.model, sets)
    explicit = {k: getattr(flags, k) for k in
                ("clip_model", "clip_pretrained", "detector", "detector_weights", "mode", "device", "precision")}
    if cfg.checkpoint and any(explicit[k] for k in ("clip_model", "clip_pretrained", "detector", "detector_weights")):
        cfg.checkpoint = None  # explicit weights replace the preset's bundled checkpoint
    for key, value in explicit.items():
        if value is not None:
            setattr(cfg, key, value)
    return RegionCLIP(config=cfg)
