"""``TrainConfig``: one YAML file describes a training run (model, data, optimiser, loss, schedule).

Every field has a default that suits the shapes demo on a CPU; ``configs/train/*.yaml`` set the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import ModelConfig, load_config
from ..errors import BadConfig


@dataclass
class DataConfig:
    train_annotations: str = ""  # COCO instances JSON
    train_images: str = ""  # folder the train file_name entries are relative to
    val_annotations: str | None = None  # None skips validation (no best.pt)
    val_images: str | None = None
    split: str | None = None  # base/novel YAML; None trains and reports on every category
    use_base_only: bool = True  # drop novel boxes from training: they are what the model must find unseen
    max_side: int | None = 320  # training images are downscaled to this longer side
    hflip_prob: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay to 0 at max_steps
    max_steps: int = 1000
    batch_size: int = 8  # images per step across ALL processes (each rank takes batch_size / world)
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # CLIP's beta2: stabler with small batches


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
    # RoIs the box head samples per image (torchvision: 512); the box head trains only with
    # proposals.source=final, where its 12544x1024 fc6 makes this the biggest cost of a CPU step.
    box_head_samples: int = 512


@dataclass
class RunConfig:
    train_image_tower: bool = True
    train_text_tower: bool = True
    train_proposals: bool = True
    # Parameter-name prefixes kept frozen on top of the switches above, e.g.
    # "proposals.detector.backbone.body": MobileNet's depthwise-conv backward is ~10x its forward on CPU.
    freeze: list[str] = field(default_factory=list)
    # BatchNorm layers keep their statistics and affine weights (FrozenBatchNorm2d's semantics),
    # as RegionCLIP and torchvision train pretrained detectors: batches of a few images per GPU
    # give poor statistics. BN under a `freeze` prefix or in a part that does not train is always
    # frozen. Set false only when training BN from scratch (configs/train/shapes_demo.yaml).
    freeze_bn: bool = True
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16
    ckpt_every: int = 200  # steps between last.pt writes (and always at the end)
    eval_every: int = 0  # steps between val mAP runs; 0 evaluates only at the end
    eval_images: int | None = None  # first N val images; None uses all
    log_every: int = 10  # steps between metrics.jsonl lines
    num_workers: int = 0  # DataLoader workers; resume is bit-exact only with 0 (worker RNG restarts)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # open_clip architectures to register before building, {name: open_clip JSON config}; lets a
    # run train a CLIP from scratch whose architecture ships in the YAML (see shapes_demo.yaml).
    clip_configs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: RunConfig = field(default_factory=RunConfig)
    out_dir: str = "runs/train"


def load_train_config(path: str | Path, overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> TrainConfig:
    """Read a training YAML, apply dotted ``overrides`` and check what can be checked before building.

    Raises ``BadConfig`` for unknown keys, wrong types and impossible values, and
    ``BadAnnotations`` (from the data loaders) later for missing or malformed data files.
    """
    cfg = load_config(TrainConfig, path, overrides)
    if out_dir is not None:
        cfg.out_dir = str(out_dir)
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
    return cfg
