"""What trains and how: the model a run starts from, which parameters learn, the optimizer's
groups and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from ..detector import RegionCLIP
from ..errors import BadConfig, BadInput
from ..proposals import frozen_backbone_prefixes


def build_model(model_cfg, run) -> RegionCLIP:
    """The model a run starts from. A detector second stage (``proposals.source`` refined or
    final) that the checkpoint lacks starts untrained when the proposals train: inference
    refuses such a checkpoint, training is where the head comes from."""
    if model_cfg.proposals.source == "rpn" or not run.train_proposals:
        return RegionCLIP(config=model_cfg)
    model = RegionCLIP(config=replace(model_cfg, proposals=replace(model_cfg.proposals, source="rpn")))
    model.proposals.detector.has_box_head = True
    model.cfg.proposals = model_cfg.proposals
    model.proposals.configure(model_cfg.proposals)
    return model


def set_trainable(model: RegionCLIP, run) -> list[nn.Parameter]:
    visual = {id(p) for p in model.clip.visual.parameters()}
    for p in model.clip.parameters():
        p.requires_grad_(run.train_image_tower if id(p) in visual else run.train_text_tower)
    model.clip.logit_scale.requires_grad_(True)  # the temperature always learns
    for p in model.proposals.parameters():
        p.requires_grad_(run.train_proposals)
    if model.box_head is not None:
        model.box_head.requires_grad_(True)  # models are built frozen (inference); the head always trains
    frozen = list(run.freeze) + frozen_backbone(model, run)
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in frozen):
            p.requires_grad_(False)
    model.clip.train(run.train_text_tower)
    model.clip.visual.train(run.train_image_tower)  # its BN must not drift when only text trains
    model.proposals.train(run.train_proposals)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if run.freeze_bn or any(f"{name}.".startswith(prefix) for prefix in frozen):
                # FrozenBatchNorm2d's semantics in place: running statistics and affine fixed.
                m.eval()
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def frozen_backbone(model: RegionCLIP, run) -> list[str]:
    """``run.trainable_backbone_layers`` (or torchvision's default) as frozen name prefixes."""
    n = run.trainable_backbone_layers
    if n is None:
        weights = model.cfg.detector_weights
        if model.cfg.checkpoint or not weights or weights == "none":
            return []
        n = 3
    try:
        return [f"proposals.detector.{p}" for p in frozen_backbone_prefixes(model.proposals.detector, n)]
    except BadInput as exc:
        raise BadConfig(f"train.{exc}") from None


def optimizer_for(params: list[nn.Parameter], o, box_head: nn.Module | None = None) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, embeddings' scalars and the temperature (CLIP's recipe).
    head = {id(p) for p in box_head.parameters()} if box_head is not None and o.box_head_lr else set()
    groups = []
    for lr, members in ((o.lr, [p for p in params if id(p) not in head]), (o.box_head_lr, [p for p in params if id(p) in head])):
        for decay, picked in ((o.weight_decay, [p for p in members if p.ndim >= 2]), (0.0, [p for p in members if p.ndim < 2])):
            if picked:
                groups.append({"params": picked, "weight_decay": decay, "lr": lr})
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int) -> LRScheduler:
    """Linear warm-up from ``1 / warmup_steps`` of the base lr to all of it over ``warmup_steps``
    steps, then cosine decay to 0 at ``max_steps`` (stepped once per step)."""
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, max_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, total_iters=max(1, warmup_steps - 1))
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
