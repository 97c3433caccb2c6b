"""``TrainConfig``: one YAML file describes a training run (model, data, optimiser, loss, schedule).

Every field has a default that suits the shapes demo on a CPU; ``configs/train/*.yaml`` set the rest.

Relative paths in the file: an input (``data.*``, ``model.checkpoint``, a weights file or teacher
preset) is read from the config file's folder when it is there, else from the project root, the
nearest folder at or above the config holding ``pyproject.toml`` (the checkout, for the shipped
configs). Outputs (``out_dir``, ``model.text.cache_dir``), ``--out`` and ``--set`` values stay
relative to the current folder. Details: ``regionclip.train.overrides``.

A staged file (``stages:``) runs each stage in ``OUT/<name>/``: ``--set stages.NAME.key=value``
changes one stage's entry, ``select_stages`` runs some of them, and ``resolve_resume`` takes the
run's output folder (see each).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import ModelConfig, from_dict, read_yaml, to_dict
from ..errors import BadConfig
from ..objectness import OBJECTNESS
from .overrides import apply_train_overrides, merged, resolve_paths, with_start_model
from .retention import RetentionConfig


@dataclass
class DataConfig:
    train_annotations: str = ""  # COCO instances JSON
    train_images: str = ""  # folder the train file_name entries are relative to
    val_annotations: str | None = None  # None skips validation (no best.pt)
    val_images: str | None = None
    split: str | None = None  # base/novel YAML; None trains and reports on every category
    use_base_only: bool = True  # drop novel boxes from training: they are what the model must find unseen
    # Categories whose boxes are none of the vocabulary (e.g. make-shapes --others' "other"): their
    # regions train as background, so a box that is something else learns to score low against
    # every name ("none of these"), not to take the nearest one.
    negative_categories: list[str] = field(default_factory=list)
    max_side: int | None = 320  # training images are downscaled to this longer side
    hflip_prob: float = 0.5
    # COCO Captions JSON of the training images (the clip and region_pretrain stages); None reads
    # captions_<x>.json next to instances_<x>.json, as `regionclip make-shapes` and COCO lay them out.
    train_captions: str | None = None
    # The concept pool captions are matched against: a phrase list, a text file (one per line), a
    # split YAML (base + novel) or a COCO instances JSON (its category names). None: the split's
    # base + novel names, else the training file's categories.
    concepts: Any = None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay to 0 at max_steps
    max_steps: int = 1000
    batch_size: int = 8  # images per step across ALL processes (each rank takes batch_size / world)
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # CLIP's beta2: stabler with small batches
    # The box head starts from random init while the towers are pretrained, and its targets are
    # deltas of unit scale (Fast R-CNN's 10, 10, 5, 5 weights): at the towers' lr an Adam step moves
    # an output by about lr, so it would need thousands of steps. None: optim.lr.
    box_head_lr: float | None = None


@dataclass
class LossConfig:
    background_samples: int = 8  # proposals with IoU < background_iou to every GT, per image
    # Below 0.5, as Fast R-CNN: a crop that covers part of an object must score as background,
    # or it outranks the whole object and costs AP50.
    background_iou: float = 0.5
    # Background proposals must overlap some GT box by at least this much (Fast R-CNN used 0.1).
    # Above 0, open-vocabulary training stops teaching unlabelled objects (the novel ones,
    # rarely near a labelled box) to look like background; 0 samples from the whole image.
    background_iou_min: float = 0.0
    # ...and this many more per image from below background_iou_min (anywhere else): a few far
    # negatives teach clutter as background while most unlabelled objects stay untouched.
    background_far_samples: int = 0
    # Far proposals the RPN scores above this objectness are left out of them: a confident box
    # that touches no labelled one is likely an object nobody labelled (measured on shapes val:
    # median objectness 0.68 on novel shapes, 0.10 on clutter). 1.0 keeps them all.
    background_far_max_objectness: float = 1.0
    positive_samples: int = 4  # proposals with IoU >= positive_iou to a GT box, trained with its label
    positive_iou: float = 0.5
    proposal_loss_weight: float = 1.0  # weight of the Faster R-CNN losses when train_proposals
    # What the RPN's objectness learns (regionclip/objectness.py): "classify" (torchvision: every
    # anchor off a labelled box is background, unlabelled objects included) or "centerness"
    # (OLN: how well an anchor sits on a labelled box, positives only, so objects nobody
    # labelled are never pushed down).
    proposal_objectness: str = "classify"
    # With caption_regions (inert without): the boxes the teacher picks for caption concepts no
    # box labels are ignore regions (left out of the RPN's negatives, the second stage's and the
    # region classifier's background samples) ...
    proposal_ignore_captions: bool = True
    # ... and positives of the RPN: captions then teach the proposals, not only the labels. Both
    # on, 300 steps on the demo lifted novel recall@10 on shapes val from 32 to 76% and novel
    # AP50 from 69.9 to 93.7 (README "Proposals for what nobody labelled").
    proposal_caption_positives: bool = True
    # Class-agnostic box refinement (regionclip/box_head.py): > 0 trains a box-regression head on
    # the raw region features of the sampled positives and GT boxes (smooth L1 on Fast R-CNN's
    # deltas) and the written preset applies it (regions.box_refinement).
    box_regression_weight: float = 0.0
    box_head_hidden: int = 0  # one hidden layer of this width before the 4 deltas; 0: linear
    # Box fine-tuning also trains on the proposals a teacher labels from captions, as
    # region_pretrain does (pretrain.* settings; teacher: pretrain.teacher, in a staged config the
    # previous stage's model): concepts no box labels keep being named while the boxes train.
    caption_regions: bool = False
    # RoIs the box head samples per image (torchvision: 512); the box head trains only with
    # proposals.source=final, where its 12544x1024 fc6 makes this the biggest cost of a CPU step.
    box_head_samples: int = 512


@dataclass
class ClipStageConfig:
    """``stage: clip``: image-level CLIP training on image-caption pairs (symmetric InfoNCE)."""

    # Side the whole image is fitted into (long side, padded square). None: the tower's own input
    # size. ViTs interpolate their position embedding to other sizes; ResNet towers need their own.
    image_size: int | None = None
    gather: bool = True  # DDP: the other ranks' features are negatives too (the global batch)


@dataclass
class PretrainConfig:
    """``stage: region_pretrain``: RegionCLIP's region-concept pretraining from a frozen teacher."""

    # The teacher CLIP: a model preset, a preset YAML or a regionclip checkpoint's preset (in a
    # staged config, default: the clip stage's). It scores proposals as crops.
    teacher: str | None = None
    proposals_per_image: int = 32  # most objectness-confident RPN proposals the teacher labels
    # A pseudo label needs this share of the teacher's probability among the image's candidate
    # concepts (0.5 with two candidates: the better one; 1 candidate always passes).
    threshold: float = 0.5
    top_k: int = 2  # pseudo-labelled proposals per concept per image, the teacher's most confident
    # Use the instances file's boxes too (RegionCLIP's pretraining uses none): a proposal on a
    # labelled box (IoU >= loss.positive_iou) takes that box's concept; one that touches none
    # (IoU < loss.background_iou_min, or 0.3 when that is 0) may only take a concept the boxes
    # never label (every instance of a labelled category has a box), e.g. a novel one its
    # captions name; the teacher picks among those and ranks the proposals.
    use_boxes: bool = False
    min_objectness: float = 0.0  # RPN objectness a proposal needs to take a caption concept
    contrastive_weight: float = 1.0  # region-concept cross-entropy on the pseudo-labelled regions
    distill_weight: float = 1.0  # KL to the teacher's soft labels over the pool, every proposal
    image_text_weight: float = 0.0  # optional image-caption InfoNCE term (the clip stage's loss)


@dataclass
class RunConfig:
    train_image_tower: bool = True
    train_text_tower: bool = True
    train_proposals: bool = True
    # Parameter-name prefixes kept frozen on top of the switches above, e.g.
    # "proposals.detector.backbone.body": MobileNet's depthwise-conv backward is ~10x its forward on CPU.
    freeze: list[str] = field(default_factory=list)
    # Detector backbone layers that train, counted from the top, as torchvision's
    # trainable_backbone_layers (ResNet 0..5, MobileNetV3 0..6); the rest stay frozen. None:
    # torchvision's rule, 3 for pretrained detector weights, all for a detector from scratch or
    # from a regionclip checkpoint (it continues its own training).
    trainable_backbone_layers: int | None = None
    # BatchNorm layers keep their statistics and affine weights (FrozenBatchNorm2d's semantics),
    # as RegionCLIP and torchvision train pretrained detectors: batches of a few images per GPU
    # give poor statistics. BN under a `freeze` prefix or in a part that does not train is always
    # frozen. Set false only when training BN from scratch (configs/train/shapes_demo.yaml).
    freeze_bn: bool = True
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16
    ckpt_every: int = 200  # steps between last.pt writes (and always at the end)
    eval_every: int = 0  # steps between val mAP runs; 0 evaluates only at the end
    eval_images: int | None = None  # the N val images with the lowest ids (same every time); None: all
    # Short lists at each validation (regionclip/shortlists.py, `eval --short-lists`): N seeded lists of
    # 3 val names, each detected alone; their mean precision, recall, AP50 and foreign-label rate go
    # to metrics.jsonl as val_short_lists, so a recipe's effect on short vocabularies shows where it is
    # made. A second pass over the val images; single-process runs only. 0: off.
    eval_short_lists: int = 0
    log_every: int = 10  # steps between metrics.jsonl lines
    # DataLoader processes decoding a batch ahead of the step (0: in the training process). Augmentation
    # is seeded per sample (train/feed.py), so a resume is bit-exact with any number.
    num_workers: int = 2


STAGES = ("clip", "region_pretrain", "finetune")


@dataclass
class TrainConfig:
    # What this run trains: clip (image-caption pairs), region_pretrain (teacher pseudo-labelled
    # proposals and captions' concepts), finetune (boxes; the default).
    stage: str = "finetune"
    # Several stages in one file: each entry names a stage and overrides sections of this file,
    # e.g. {name: clip, stage: clip, optim: {max_steps: 2000}}. Each writes OUT/<name>/ and starts
    # from the previous one's model.pt (`start: scratch` builds the model afresh; the previous
    # model still teaches); the last one's preset is copied to OUT/preset.yaml.
    stages: list[dict[str, Any]] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    # open_clip architectures to register before building, {name: open_clip JSON config}; lets a
    # run train a CLIP from scratch whose architecture ships in the YAML (see shapes_demo.yaml).
    clip_configs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: RunConfig = field(default_factory=RunConfig)
    clip: ClipStageConfig = field(default_factory=ClipStageConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # A trained model the run starts from: a preset name, a preset YAML or a finished run's
    # folder. Its model config (weights included) is the run's, under the keys `model:` sets.
    from_model: str | None = None
    # What the fine-tune costs the starting model's own names, and ways to keep them (retention.py).
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    out_dir: str = "runs/train"


def load_train_config(path: str | Path, overrides: Sequence[str] = (), out_dir: str | Path | None = None,
                      stages: Sequence[str] | None = None, resume: str | Path | None = None) -> TrainConfig:
    """Read a training YAML, apply dotted ``overrides`` and check what can be checked before building.

    Relative input paths in the file are resolved as the module docstring says. ``out_dir``
    replaces the file's; without it, ``resume`` (a run's output folder or checkpoint) makes the
    run continue in that run's folder. ``stages`` (names) runs only those stages of a staged file
    (``select_stages``).

    Raises ``BadConfig`` for unknown keys, wrong types and impossible values, and
    ``BadAnnotations`` (from the data loaders) later for missing or malformed data files.
    """
    data = with_start_model(apply_train_overrides(resolve_paths(read_yaml(path), path), list(overrides)))
    cfg = from_dict(TrainConfig, data, where=str(path))
    if out_dir is not None:
        cfg.out_dir = str(out_dir)
    elif resume is not None:
        cfg.out_dir = str(_resume_run_folder(cfg, resume))
    if stages:
        cfg = select_stages(cfg, stages)
    previous = None
    for i in range(len(cfg.stages)):
        # Every stage is checked now, not after the earlier ones have trained for an hour.
        stage = check_train_config(stage_config(cfg, i, previous), f"{path} (stages[{i}])")
        previous = Path(stage.out_dir)
    return check_train_config(cfg, path)


def stage_names(cfg: TrainConfig) -> list[str]:
    return [str(entry.get("name")) for entry in cfg.stages]


def select_stages(cfg: TrainConfig, names: Sequence[str]) -> TrainConfig:
    """``cfg`` running only the stages ``names`` (in the file's order, whatever order they are
    given in). A stage whose predecessor does not run now starts from that predecessor's output
    in ``OUT/<name>/`` (its ``model.pt``, and its ``preset.yaml`` as the teacher), which must exist.

    Raises ``BadConfig``: no stages in ``cfg``, a name that is not a stage (naming those there
    are), or a predecessor's output that is missing.
    """
    known = stage_names(cfg)
    if not known:
        raise BadConfig("this config has no stages (no stages: list): leave out --stages")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadConfig(f"unknown stage '{unknown[0]}': this config's stages are {', '.join(known)}")
    picked, previous = [], None
    for i, entry in enumerate(cfg.stages):
        if known[i] in names and i > 0 and known[i - 1] not in names:
            full = stage_config(cfg, i, previous)
            needs = [full.model.checkpoint] if entry.get("start", "previous") == "previous" else []
            if full.pretrain.teacher == str(previous / "preset.yaml"):
                needs.append(full.pretrain.teacher)
            missing = [p for p in needs if not Path(p).is_file()]
            if missing:
                raise BadConfig(f"stage {known[i]} starts from the output of stage {known[i - 1]}, but {missing[0]} does not "
                                f"exist: run --stages {known[i - 1]},{known[i]} (or {known[i - 1]} first)")
            # Spelled out in full, so the stage no longer depends on which stage runs before it.
            explicit = {k: v for k, v in to_dict(full).items() if k not in ("stages", "out_dir")}
            picked.append({**explicit, "name": known[i], "start": "scratch"})
        elif known[i] in names:
            picked.append(entry)
        previous = Path(cfg.out_dir) / known[i]
    data = to_dict(cfg)
    data["stages"] = picked
    return from_dict(TrainConfig, data)


def _resume_run_folder(cfg: TrainConfig, resume: str | Path) -> Path:
    """The output folder of the run ``resume`` points into (a folder, a checkpoint in it, or a
    stage's checkpoint in ``RUN/<stage>/``)."""
    path = Path(resume)
    if not path.exists():
        raise BadConfig(f"resume {resume}: no such file or folder; pass the output folder of an earlier run "
                        "(or its last.pt)")
    if path.is_dir():
        return path
    return path.parent.parent if cfg.stages and path.parent.name in stage_names(cfg) else path.parent


def resolve_resume(cfg: TrainConfig, resume: str | Path | None) -> Path | None:
    """What ``train(cfg, resume=...)`` continues from. One stage: a checkpoint (``last.pt`` or
    ``best.pt``; a run's output folder means its ``last.pt``). A staged config: the run's output
    folder, which must be ``cfg.out_dir`` (a stage's ``RUN/<stage>/last.pt`` means ``RUN``);
    each stage continues from its own ``last.pt`` and finished stages are skipped.

    Raises ``BadConfig`` (one line) when there is nothing there to continue from: a run never
    silently starts afresh because a path was mistyped.
    """
    if resume is None:
        return None
    path, run = Path(resume), _resume_run_folder(cfg, resume)
    if not cfg.stages:
        if path.is_dir() and not (path / "last.pt").is_file():
            raise BadConfig(f"resume {resume}: this folder holds no last.pt; pass the output folder of an earlier "
                            "run of this config, or one of its checkpoints")
        return path / "last.pt" if path.is_dir() else path
    if path.is_file() and run == path.parent:
        raise BadConfig(f"resume {resume}: a staged config continues a run from its output folder (each stage from "
                        f"its own last.pt): pass {run}")
    if run.resolve() != Path(cfg.out_dir).resolve():
        raise BadConfig(f"resume {resume} continues the run in {run}, but this run writes to {cfg.out_dir}: "
                        "pass the same folder to --out, or leave --out out")
    names = stage_names(cfg)
    if not any((run / name / "last.pt").is_file() for name in names):
        raise BadConfig(f"resume {resume}: {run} holds no stage checkpoint ({run}/{names[0]}/last.pt, ...): "
                        "start without --resume")
    return run


def stage_config(cfg: TrainConfig, index: int, previous: Path | None = None) -> TrainConfig:
    """Stage ``index`` of a staged config: the file's sections with the stage's overrides merged
    in, writing to ``OUT/<name>``, starting from ``previous`` (the earlier stage's output folder)."""
    entry = dict(cfg.stages[index])
    name = entry.pop("name", None)
    if not isinstance(name, str) or not name or "/" in name:
        raise BadConfig(f"stages[{index}] needs a name (its output folder), e.g. name: clip")
    start = entry.pop("start", "previous")
    if start not in ("previous", "scratch"):
        raise BadConfig(f"stages[{index}].start must be previous (the last stage's model) or scratch, not {start!r}")
    data = to_dict(cfg)
    data["stages"] = []
    data = merged(data, entry)
    data["out_dir"] = str(Path(cfg.out_dir) / name)
    if previous is not None:
        if start == "previous":
            data["model"]["checkpoint"] = str(previous / "model.pt")
        wants_teacher = data.get("stage") == "region_pretrain" or data["loss"].get("caption_regions")
        if wants_teacher and not data["pretrain"].get("teacher"):
            data["pretrain"]["teacher"] = str(previous / "preset.yaml")
    return from_dict(TrainConfig, data, where=f"stages[{index}]")


def check_train_config(cfg: TrainConfig, path: str | Path) -> TrainConfig:
    """The checks that need no files or models; returns ``cfg``."""
    if cfg.stages:
        return cfg  # the file's own sections only seed its stages
    if cfg.stage not in STAGES:
        raise BadConfig(f"{path}: unknown stage '{cfg.stage}': use one of {', '.join(STAGES)}")
    if not cfg.data.train_annotations or not cfg.data.train_images:
        raise BadConfig(f"{path}: data.train_annotations and data.train_images are required")
    if (cfg.data.val_annotations is None) != (cfg.data.val_images is None):
        raise BadConfig(f"{path}: set both data.val_annotations and data.val_images, or neither")
    o = cfg.optim
    if o.max_steps < 1 or o.batch_size < 1 or o.lr <= 0 or o.warmup_steps < 0:
        raise BadConfig(f"{path}: optim needs max_steps >= 1, batch_size >= 1, lr > 0, warmup_steps >= 0")
    lc = cfg.loss
    if lc.background_samples < 0 or lc.background_far_samples < 0 or lc.positive_samples < 0:
        raise BadConfig(f"{path}: loss sample counts must be >= 0")
    if not 0 <= lc.background_iou_min < lc.background_iou <= lc.positive_iou <= 1:
        raise BadConfig(f"{path}: loss needs 0 <= background_iou_min < background_iou <= positive_iou <= 1")
    if not 0 < lc.background_far_max_objectness <= 1:
        raise BadConfig(f"{path}: loss.background_far_max_objectness must be in (0, 1]")
    if len(o.betas) != 2:
        raise BadConfig(f"{path}: optim.betas must be two numbers, e.g. [0.9, 0.98]")
    for name, arch in cfg.clip_configs.items():
        if not isinstance(arch, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(arch):
            raise BadConfig(f"{path}: clip_configs.{name} must be an open_clip config with embed_dim, vision_cfg, text_cfg")
    if not (cfg.train.train_image_tower or cfg.train.train_text_tower or cfg.train.train_proposals):
        raise BadConfig(f"{path}: nothing to train: enable one of train.train_image_tower/train_text_tower/train_proposals")
    if cfg.train.eval_short_lists < 0:
        raise BadConfig(f"{path}: train.eval_short_lists must be 0 (off) or more")
    if cfg.train.eval_images is not None and cfg.train.eval_images < 1:
        raise BadConfig(f"{path}: train.eval_images must be at least 1 (or null for every val image)")
    if lc.proposal_objectness not in OBJECTNESS:
        raise BadConfig(f"{path}: loss.proposal_objectness must be one of {', '.join(OBJECTNESS)}, "
                        f"not {lc.proposal_objectness!r}")
    if lc.box_regression_weight < 0 or lc.box_head_hidden < 0:
        raise BadConfig(f"{path}: loss.box_regression_weight and loss.box_head_hidden must be >= 0")
    pc = cfg.pretrain
    if pc.proposals_per_image < 1 or pc.top_k < 1 or not 0 <= pc.threshold <= 1 or not 0 <= pc.min_objectness <= 1:
        raise BadConfig(f"{path}: pretrain needs proposals_per_image >= 1, top_k >= 1, threshold and min_objectness in [0, 1]")
    if min(pc.contrastive_weight, pc.distill_weight, pc.image_text_weight) < 0:
        raise BadConfig(f"{path}: pretrain loss weights must be >= 0")
    if (cfg.stage == "region_pretrain" or lc.caption_regions) and not pc.teacher:
        raise BadConfig(f"{path}: stage region_pretrain and loss.caption_regions need pretrain.teacher "
                        "(a model preset or preset YAML)")
    rc = cfg.retention
    if (rc.annotations is None) != (rc.images is None):
        raise BadConfig(f"{path}: set both retention.annotations and retention.images, or neither")
    if not 0 <= rc.wise_alpha <= 1 or rc.distill_weight < 0 or rc.top_k < 1:
        raise BadConfig(f"{path}: retention needs wise_alpha in [0, 1], distill_weight >= 0 and top_k >= 1")
    if (rc.wise_alpha < 1 or rc.distill_weight > 0 or rc.replay_images) and not rc.annotations:
        raise BadConfig(f"{path}: retention.wise_alpha, distill_weight and replay_images need the held-out set "
                        "(retention.annotations and retention.images) to report what they keep")
    if rc.replay_count < 1 or not 0 <= rc.replay_threshold <= 1:
        raise BadConfig(f"{path}: retention needs replay_count >= 1 and replay_threshold in [0, 1]")
    if rc.replay_images and (cfg.stage != "finetune" or lc.caption_regions):
        raise BadConfig(f"{path}: retention.replay_images is for stage finetune without loss.caption_regions "
                        "(replayed images have no captions)")
    if cfg.clip.image_size is not None and cfg.clip.image_size < 16:
        raise BadConfig(f"{path}: clip.image_size must be at least 16 pixels")
    return cfg
