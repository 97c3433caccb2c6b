"""Options shared by commands that build a model, and the one function that builds it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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


def build_model(
    model: str,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    detector: str | None = None,
    detector_weights: str | None = None,
    mode: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    overrides: list[str] | None = None,
    text_cache: Path | None = None,
    **extra: str,
) -> RegionCLIP:
    """Preset + explicit flags -> model. Flags win over the preset; None leaves the preset's value."""
    sets = list(overrides or [])
    if text_cache is not None:
        sets.append(f"text.cache_dir={text_cache}")
    cfg = resolve_model_config(model, sets)
    flags = dict(clip_model=clip_model, clip_pretrained=clip_pretrained, detector=detector,
                 detector_weights=detector_weights, mode=mode, device=device, precision=precision, **extra)
    if cfg.checkpoint and any(flags[k] for k in ("clip_model", "clip_pretrained", "detector", "detector_weights")):
        cfg.checkpoint = None  # explicit weights replace the preset's bundled checkpoint
    for key, value in flags.items():
        if value is not None:
            setattr(cfg, key, value)
    return RegionCLIP(config=cfg)
