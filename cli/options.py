"""Options shared by commands that build a model, the checks run before building it, and building it.

Nothing here imports torch at module level: ``regionclip --help`` must not pay for it. The
model is built by ``build_model``, after every cheap check of a command has passed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, Sequence

import typer
from typer.core import TyperCommand, TyperGroup

from regionclip.config import ModelConfig, ScoringConfig, check_scoring
from regionclip.errors import BadConfig, BadInput

from .render import WholeNamesHelp

if TYPE_CHECKING:
    from regionclip import RegionCLIP

PRESET = "default: the preset's"


def _preset_default(value: Any) -> str:
    return f"({PRESET}; {value} unless it sets one)"


class Command(WholeNamesHelp, TyperCommand):
    """A typer command whose help shows flags as flags: no ``<bool>`` beside ``--help`` or ``--x/--no-x``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Group(WholeNamesHelp, TyperGroup):
    """The root group, with the same ``--help`` rendering as ``Command``."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


Model = Annotated[str, typer.Option("--model", "-m", help="Preset in configs/models/ (demo, vitb16, rn50, fast, "
                                                          "regionclip-rn50-coco, ...), a model YAML path, a training run's "
                                                          "output folder (its preset.yaml) or an ONNX export folder.")]
ClipModel = Annotated[Optional[str], typer.Option(help=f"open_clip architecture, e.g. ViT-B-16, RN50 ({PRESET}).", show_default=False)]
ClipPretrained = Annotated[Optional[str], typer.Option(help="open_clip pretrained tag (openai, laion2b_...), a local checkpoint path, "
                                                            f"or 'none' for random weights ({PRESET}).", show_default=False)]
Detector = Annotated[Optional[str], typer.Option(help="torchvision builder: fasterrcnn_resnet50_fpn_v2, fasterrcnn_resnet50_fpn, "
                                                      f"fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn ({PRESET}).",
                                                 show_default=False)]
DetectorWeights = Annotated[Optional[str], typer.Option(help=f"'coco' (torchvision weights), a local checkpoint path, or 'none' ({PRESET}).",
                                                        show_default=False)]
Mode = Annotated[Optional[str], typer.Option(help="Region embeddings: 'crop' (RoIAlign crops through the tower) or 'pool' (one dense "
                                                  f"pass per image) {_preset_default(ModelConfig.mode)}.", show_default=False)]
Device = Annotated[Optional[str], typer.Option(help=f"auto, cpu, cuda or cuda:N {_preset_default(ModelConfig.device)}.", show_default=False)]
Precision = Annotated[Optional[str], typer.Option(help=f"fp32, bf16 or fp16 (fp16 needs CUDA) {_preset_default(ModelConfig.precision)}.",
                                                  show_default=False)]
Set = Annotated[Optional[list[str]], typer.Option("--set", help="Dotted config override, e.g. --set proposals.num_proposals=100 (repeatable).",
                                                  show_default=False)]
TextCache = Annotated[Optional[Path], typer.Option(help=("Folder for the on-disk text-embedding cache (default: $REGIONCLIP_CACHE or "
                                                   "~/.cache/regionclip; --set text.disk_cache=false for memory only)."),
                                                   show_default=False)]

VocabFile = Annotated[Optional[Path], typer.Option("--vocab", help=(
    "Vocabulary file (YAML): classes with prompts, exemplars IMAGE:x1,y1,x2,y2, negatives and thresholds "
    "(docs/vocabulary.md)."), show_default=False)]
Exemplar = Annotated[Optional[list[str]], typer.Option("--exemplar", help=(
    'An example box of a class, "NAME=IMAGE:x1,y1,x2,y2" (pixels; repeatable); adds to the class of that '
    "name or makes an exemplar-only one."), show_default=False)]

Distractors = Annotated[Optional[str], typer.Option("--distractors", help=(
    "Names scored beside the labels and never reported, so an unlisted object does not get the nearest "
    "listed name: default (the model's: the demo's own 12 names, a CLIP preset's common objects), none, "
    "labels, common, or a file with one name per line."), show_default=False)]


def check_distractors(spec: str | None) -> str | None:
    """The ``--distractors`` value, checked before any model loads."""
    if spec is not None:
        from regionclip.distractors import check_spec

        check_spec(spec)
    return spec


def resolve_vocab(labels: Sequence[str] | None, vocab: Path | None, exemplars: Sequence[str] | None):
    """The command's ``Vocabulary`` (checked, exemplar headers read) or None for plain labels."""
    if vocab is None and not exemplars:
        return None
    from regionclip.vocabulary import Vocabulary

    if vocab is not None and labels:
        raise BadInput("give --labels or --vocab, not both")
    return Vocabulary.resolve(labels=labels or None, vocab=vocab, exemplars=exemplars or ())


# Scoring flags: None keeps the preset's value.
ScoreThreshold = Annotated[Optional[float], typer.Option(
    help=f"Drop detections scoring below this, in [0, 1] {_preset_default(ScoringConfig.score_threshold)}.", show_default=False)]
NmsIou = Annotated[Optional[float], typer.Option(
    help=f"IoU in [0, 1] for per-label non-maximum suppression {_preset_default(ScoringConfig.nms_iou)}.", show_default=False)]
MaxDetections = Annotated[Optional[int], typer.Option(
    help=f"Keep at most this many detections per image, at least 1 {_preset_default(ScoringConfig.max_detections)}.", show_default=False)]
TopK = Annotated[Optional[int], typer.Option(
    help=f"Labels kept per box, at least 1 {_preset_default(ScoringConfig.top_k)}.", show_default=False)]
AgnosticNms = Annotated[Optional[bool], typer.Option(
    "--agnostic-nms/--no-agnostic-nms",
    help="Also suppress overlapping boxes across labels, so one object gets one box "
         f"{_preset_default('on' if ScoringConfig.agnostic_nms else 'off')}.", show_default=False)]
BatchSize = Annotated[int, typer.Option(help="Images per batch, at least 1.")]
TextEmbeddings = Annotated[Optional[Path], typer.Option(help=(
    "Label embeddings from a file instead of the text tower: a RegionCLIP concept-embedding file such as "
    "coco_65_cls_emb.pth, an (N, D) tensor with one row per label, in the labels' order."), show_default=False)]

Tile = Annotated[Optional[int], typer.Option("--tile", help=(
    "Detect small objects in large images by overlapping windows of this many pixels (e.g. 320 for the demo, "
    "640-1024 for vitb16), plus one pass over the whole image, merged; images no larger than a window run as "
    "without. --max-detections then counts the whole image's boxes."), show_default=False)]
TileOverlap = Annotated[Optional[float], typer.Option("--tile-overlap", help=(
    "Share of a window its neighbours overlap, in [0, 0.75] (default 0.2 with --tile); at least an object's "
    "size, so that some window holds it whole."), show_default=False)]


def check_tile(tile: int | None, overlap: float | None) -> dict:
    """``--tile`` / ``--tile-overlap`` checked before any model loads; the keywords for
    ``Predictor.stream`` (empty without ``--tile``). ``BadInput`` names the flag."""
    from regionclip.tiles import check_tiling

    try:
        tiling = check_tiling(tile, overlap)
    except BadInput as exc:
        message = str(exc).replace("tile_overlap", "--tile-overlap").replace("needs tile", "needs --tile")
        raise BadInput(message if message.startswith("--") else "--" + message) from None
    return {} if tiling is None else {"tile": tiling.size, "tile_overlap": tiling.overlap}


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
            flags.model = model_source(flags.model)
            return command(**kwargs, flags=flags)

        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=_FLAG_TYPES[n],
                                   default=getattr(ModelFlags, n)) for n in names]
        wrapper.__signature__ = inspect.Signature(own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


def model_source(spec: str) -> str:
    """``--model``'s value as the library reads it: a training run's folder becomes its
    ``preset.yaml``; a preset name, a YAML path or an ONNX export folder stays as given.

    Raises ``BadConfig`` (one line saying what the folder should hold) for any other folder.
    """
    from regionclip.config import RUN_PRESET, model_preset_path, run_preset_path
    from regionclip.onnx.manifest import MANIFEST, is_export_dir

    folder = Path(spec)
    if model_preset_path(spec) is not None or not folder.is_dir() or is_export_dir(folder):
        return spec
    preset = run_preset_path(folder)
    if preset is not None:
        return str(preset)
    if any(folder.glob("last.pt")) or any(folder.glob("*/last.pt")):  # a run, or a staged run's stage
        raise BadConfig(f"--model {spec}: this training run has not finished: {RUN_PRESET} is written at its end "
                        f"(continue it with regionclip train CONFIG --resume {spec})")
    raise BadConfig(f"--model {spec}: this folder holds neither {RUN_PRESET} (what regionclip train writes) nor "
                    f"{MANIFEST} (what regionclip export writes): pass a training run's output folder, an ONNX "
                    "export folder, a model YAML or a preset name")


_SCORING_FLAGS = {"score_threshold": "--score-threshold", "nms_iou": "--nms-iou", "max_detections": "--max-detections",
                  "top_k": "--top-k", "agnostic_nms": "--agnostic-nms"}


def check_scoring_flags(**given: Any) -> dict[str, Any]:
    """Check scoring flag values (None: not given) with ``regionclip.config.check_scoring``.

    Runs before anything is built; returns the given ones as a dict for ``RegionCLIP.detect``.
    Raises ``BadConfig`` whose message names the flag.
    """
    given = {k: v for k, v in given.items() if v is not None}
    try:
        check_scoring(dataclasses.replace(ScoringConfig(), **given))
    except BadConfig as exc:
        message = str(exc)
        for field, flag in _SCORING_FLAGS.items():
            if message.startswith(field + " "):
                message = flag + message[len(field):]
                break
        raise BadConfig(message) from None
    return given


def check_positive(flag: str, value: int) -> int:
    """``value`` if it is at least 1, else ``BadInput`` naming ``flag``."""
    if value < 1:
        raise BadInput(f"{flag} must be at least 1, but got {value}")
    return value


def read_text_embeddings(path: Path | None, labels: Sequence[str]):
    """``--text-embeddings``: the file's rows, checked against the labels' count (before a model is
    built; the dimension is checked against the model's). None when not given."""
    if path is None:
        return None
    from regionclip.vocabulary import concept_vocabulary

    return concept_vocabulary(path, labels)


def resolve_config(flags: ModelFlags, extra_sets: Sequence[str] = ()) -> ModelConfig:
    """Preset + ``--set`` + explicit flags -> the model config (cheap: reads YAML, builds nothing)."""
    from regionclip.detector import resolve_model_config  # here, not at the top: --help must not import torch

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
    return cfg


def build_model(flags: ModelFlags | ModelConfig, extra_sets: Sequence[str] = ()) -> RegionCLIP:
    """Flags (or a config from ``resolve_config``) -> model. Flags win over the preset."""
    from regionclip.detector import RegionCLIP

    cfg = flags if isinstance(flags, ModelConfig) else resolve_config(flags, extra_sets)
    return RegionCLIP(config=cfg)
