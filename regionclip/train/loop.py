"""The training loop: region embeddings of GT boxes vs text embeddings of the vocabulary.

One readable step (detectron2's ``run_step`` is the model): sample background proposals ->
embed GT + background boxes with the configured region encoder -> cross-entropy over
region-to-text similarities (every other category is a negative; background is a zero
embedding, i.e. a constant logit 0, exactly what ``ScoringConfig.background`` scores against)
-> plus the class-agnostic Faster R-CNN losses -> AdamW with warm-up + cosine, clipping.
DDP comes from torchrun's environment (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ..batch import ImageBatch
from ..config import dump_config, to_dict
from ..data import CocoDetection, load_split
from ..detector import RegionCLIP
from ..errors import BadConfig, BadInput
from ..proposals import frozen_backbone_prefixes
from ..eval_dataset import evaluate_model
from ..evaluate import first_images
from ..runtime import autocast_for, resolve_device
from ..box_head import BoxRefiner
from ..weights import register_clip_config
from .config import TrainConfig, stage_config
from .feed import Feed
from .losses import box_regression_loss, mean_count
from .sampling import sample_regions
from .stages import ImageTextLoss, RegionConceptLoss, Teacher, captioned
from .state import atomic_save, load_checkpoint, lr_factor, rng_state, set_rng_state

Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # global mean loss of every step this process ran
    evals: list[dict] = field(default_factory=list)  # {"step", "base": AP50, "novel": AP50, "overall": AP50}
    model: RegionCLIP | None = None
    out_dir: Path | None = None


class RegionTextLoss(nn.Module):
    """The trainable graph in one module, so DDP can wrap it: returns a dict of scalar losses.

    ``vocab`` names the targets' labels (``len(vocab)`` meaning background); ``text_emb`` its
    fixed embeddings when the text tower does not train (None: embedded every step, with
    gradients)."""

    def __init__(self, model: RegionCLIP, cfg: TrainConfig, world: int, vocab: list[str],
                 text_emb: torch.Tensor | None = None, captions: RegionConceptLoss | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.world = world
        self.vocab = vocab
        self.text_emb = text_emb
        # loss.caption_regions: proposals a teacher labels from captions join the batch's regions,
        # their concepts appended to the vocabulary (the base names first, as the targets count).
        self.captions = captions
        if captions is not None:
            self.vocab = vocab + [c for c in captions.pool.names if c not in vocab]
            index = {name: k for k, name in enumerate(self.vocab)}
            self.concept_labels = torch.tensor([index[c] for c in captions.pool.names])

    def forward(self, batch: ImageBatch, targets) -> tuple[dict[str, torch.Tensor], int]:
        """One step's losses over ``batch`` (training targets in its pixels). Returns the losses
        and the number of regions this process trained on."""
        m, run, lc = self.model, self.cfg.train, self.cfg.loss
        losses = {}
        # One backbone + RPN pass serves both the proposal losses and the region sampling.
        targets_in = targets
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        picked = None  # the teacher's caption regions, picked once from this step's proposals

        def caption_boxes(proposals):
            nonlocal picked
            picked = self.captions.caption_regions(batch, proposals, targets_in)
            return (picked[0] if lc.proposal_ignore_captions else None,
                    picked[0] if lc.proposal_caption_positives else None)

        if run.train_proposals:
            shaped = self.captions is not None and (lc.proposal_ignore_captions or lc.proposal_caption_positives)
            proposals, det_losses = m.proposals.forward_train(
                batch.images(), targets, lc.proposal_objectness, caption_boxes if shaped else None)
            losses = {k: v * lc.proposal_loss_weight for k, v in det_losses.items()}
        elif lc.positive_samples or lc.background_samples or lc.background_far_samples:
            with torch.no_grad():
                # Probabilities whatever the scoring recipe fuses: sampling thresholds and
                # rankings read objectness as one (a raw RPN logit is negative below 0.5).
                proposals = list(zip(*m.propose(batch, logits=False)))
        else:
            proposals = [(t["boxes"].new_zeros((0, 4)), t["boxes"].new_zeros((0,))) for t in targets]
        if self.captions is not None and picked is None:
            caption_boxes(proposals)
        background = len(self.vocab)
        ignore = picked[0] if picked is not None and lc.proposal_ignore_captions else None
        boxes, labels, matched = sample_regions(proposals, targets_in, lc, background=background, ignore=ignore)
        regress = [torch.ones(len(b), dtype=torch.bool, device=labels.device) for b in boxes]
        if self.captions is not None:
            extra, concepts = picked
            per_image = list(labels.split([len(b) for b in boxes]))
            for i, (e, c) in enumerate(zip(extra, concepts)):
                boxes[i] = torch.cat([boxes[i], e])
                per_image[i] = torch.cat([per_image[i], self.concept_labels.to(c.device)[c]])
                matched[i] = torch.cat([matched[i], e])
                regress[i] = torch.cat([regress[i], torch.zeros(len(e), dtype=torch.bool, device=e.device)])
            labels = torch.cat(per_image)
        text_emb = self.text_emb if self.text_emb is not None else m.text.embed(self.vocab)
        raw = m.embed(batch, boxes, raw=True)
        logits = m.logits(F.normalize(raw, dim=-1), text_emb, background=True,
                          scale=m.clip.logit_scale.exp().clamp(max=100))
        # Divide by the global region count so DDP's gradient averaging gives the global mean.
        norm = mean_count(len(labels), self.world, batch.device)
        losses["loss_region_text"] = F.cross_entropy(logits, labels, reduction="sum") / norm
        if m.box_head is not None and lc.box_regression_weight > 0:
            # Fast R-CNN's box loss: the foreground regions' deltas to their matched GT box,
            # summed and divided by all sampled regions (torchvision's normalisation).
            fg = (labels != background) & torch.cat(regress)  # caption regions have no box target
            flat = torch.cat(boxes)
            targets_d = m.box_head.targets(flat[fg], torch.cat(matched)[fg])
            deltas = m.box_head(raw[fg]).float()
            losses["loss_box_reg"] = lc.box_regression_weight * box_regression_loss(deltas, targets_d).sum() / norm
        return losses, len(labels)


def evaluate(model: RegionCLIP, val: CocoDetection, split: dict | None, rank: int = 0,
             world: int = 1, batch_size: int = 8, images: int | None = None) -> dict[str, float | None]:
    """Val AP50 (percent) overall and, with a split, on base and novel: ``regionclip eval``'s own
    code; under ``"R50@100"`` the class-agnostic proposal recall at IoU 0.5 within the top 100
    per part (``regionclip/recall.py``). With ``world`` > 1 every process runs its share of the
    batches and the detections are gathered before scoring; every process gets the same figures
    as one process would. ``images`` (``train.eval_images``) scores the val images with the
    lowest ids only, the same ones every time."""
    model.eval()
    model.text.clear()  # the text tower may have changed since the last cached embeddings
    gather = None
    if world > 1:
        def gather(part):
            parts = [None] * world
            dist.all_gather_object(parts, part)
            return parts
    report, _ = evaluate_model(model, first_images(val.coco, images), val.images_dir, split=split, vocabulary=val.category_names,
                               batch_size=batch_size, workers=0, shard=(rank, world), gather=gather)
    ap = {part: figures["AP50"] for part, figures in report["map"].items() if part in ("overall", "base", "novel")}
    return {**ap, "R50@100": {part: row["R50@100"] for part, row in report["proposal_recall"].items()}}


def _build(model_cfg, run) -> RegionCLIP:
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


def _set_trainable(model: RegionCLIP, run) -> list[nn.Parameter]:
    visual = {id(p) for p in model.clip.visual.parameters()}
    for p in model.clip.parameters():
        p.requires_grad_(run.train_image_tower if id(p) in visual else run.train_text_tower)
    model.clip.logit_scale.requires_grad_(True)  # the temperature always learns
    for p in model.proposals.parameters():
        p.requires_grad_(run.train_proposals)
    frozen = list(run.freeze) + _frozen_backbone(model, run)
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


def _frozen_backbone(model: RegionCLIP, run) -> list[str]:
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


def _optimizer(params: list[nn.Parameter], o, box_head: nn.Module | None = None) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, embeddings' scalars and the temperature (CLIP's recipe).
    head = {id(p) for p in box_head.parameters()} if box_head is not None and o.box_head_lr else set()
    groups = []
    for lr, members in ((o.lr, [p for p in params if id(p) not in head]), (o.box_head_lr, [p for p in params if id(p) in head])):
        for decay, picked in ((o.weight_decay, [p for p in members if p.ndim >= 2]), (0.0, [p for p in members if p.ndim < 2])):
            if picked:
                groups.append({"params": picked, "weight_decay": decay, "lr": lr})
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def _dist_init(device_spec: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = resolve_device(device_spec).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
    if world > 1 and resolve_device(device_spec).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)  # NCCL's own buffers and any bare "cuda" go to this rank's GPU
        device_spec = f"cuda:{local}"
    return (dist.get_rank() if world > 1 else 0), world, device_spec


def run_stages(cfg: TrainConfig, resume: str | os.PathLike | None = None,
               progress: Progress | None = None) -> TrainResult:
    """Each of ``cfg.stages`` in turn, each in ``OUT/<name>/`` starting from the previous one's
    model. With ``resume`` (any value), a stage continues from its own ``last.pt`` when it has one
    (a finished one does nothing). The last stage's preset is copied to ``OUT/preset.yaml``."""
    previous, result = None, None
    for i, entry in enumerate(cfg.stages):
        stage = stage_config(cfg, i, previous)
        last = Path(stage.out_dir) / "last.pt"
        name = entry["name"]

        def tagged(event: dict, name=name) -> None:
            progress({**event, "stage": name})

        result = train(stage, resume=last if resume is not None and last.is_file() else None,
                       progress=tagged if progress else None)
        previous = Path(stage.out_dir)
    out = Path(cfg.out_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "preset.yaml").write_text((previous / "preset.yaml").read_text())
    result.out_dir = out
    return result


def _all_mean(x: torch.Tensor, world: int) -> list[float]:
    """Per-process values ``x`` (a 1-D tensor, e.g. the losses of the steps since the last log)
    -> their means over the processes, on the host: the one place a step's loss leaves the device.
    NCCL reduces CUDA tensors, gloo CPU ones: ``x`` lives where its process trains."""
    x = x.double()
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x.tolist()


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, progress: Progress | None = None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; write checkpoints, metrics and the model.

    Outputs in ``cfg.out_dir``: ``config.yaml`` (resolved), ``last.pt``/``best.pt`` (model,
    optimizer, scheduler, step, data position, RNG), ``metrics.jsonl``, and at the end
    ``model.pt`` (``RegionCLIP.save``) with ``preset.yaml`` for ``regionclip detect --model``.
    ``progress`` (rank 0 only) receives ``{"step", "max_steps", "loss", "lr", "img_per_s"}``
    after every step and ``{"step", "eval": {...}}`` after every evaluation.

    ``cfg.stage`` picks what trains (``finetune``: boxes; ``clip`` and ``region_pretrain``: see
    ``stages.py``); a config with ``stages`` runs each in turn (``run_stages``).
    """
    if cfg.stages:
        return run_stages(cfg, resume, progress)
    rank, world, cfg.model.device = _dist_init(cfg.model.device)
    if cfg.stage == "clip":  # whole images against captions: no proposals in the graph
        cfg.train.train_proposals = False
    out = Path(cfg.out_dir)
    o, run, lc = cfg.optim, cfg.train, cfg.loss
    if o.batch_size % world:
        raise BadConfig(f"optim.batch_size {o.batch_size} must be divisible by the {world} processes")
    per_rank = o.batch_size // world

    split = load_split(cfg.data.split) if cfg.data.split else None
    train_cats = (split["base"] if cfg.data.use_base_only else split["base"] + split["novel"]) if split else None
    train_set = CocoDetection(cfg.data.train_annotations, cfg.data.train_images, train_cats, train=True,
                              max_side=cfg.data.max_side, hflip_prob=cfg.data.hflip_prob)
    if cfg.stage != "finetune" or lc.caption_regions:
        train_set = captioned(train_set, cfg, split)
    val = None
    if cfg.data.val_annotations and cfg.stage != "clip":  # AP means nothing before boxes
        val = CocoDetection(cfg.data.val_annotations, cfg.data.val_images,
                            split["base"] + split["novel"] if split else None)
    vocab = train_set.category_names

    for name, arch in cfg.clip_configs.items():
        register_clip_config(name, arch)
    torch.manual_seed(run.seed)
    model = _build(cfg.model, run)
    model.proposals.detector.roi_heads.fg_bg_sampler.batch_size_per_image = lc.box_head_samples
    device = model.device
    if cfg.stage == "finetune" and lc.box_regression_weight > 0 and model.box_head is None:
        model.box_head = BoxRefiner(model.regions.embed_dim(), lc.box_head_hidden).to(device)
    precision = run.precision if run.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = autocast_for(precision, device)
    # fp16's narrow range needs loss scaling; bf16 and fp32 run with the scaler disabled.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = _set_trainable(model, run)
    optimizer = _optimizer(params, o, model.box_head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o.warmup_steps, o.max_steps))
    if cfg.stage == "clip":
        loss_module = ImageTextLoss(model, cfg, world)
    elif cfg.stage == "region_pretrain":
        teacher = Teacher(cfg.pretrain.teacher, train_set.pool, device)
        loss_module = RegionConceptLoss(model, teacher, train_set.pool, cfg, world, vocab)
    else:
        labeler = None
        if lc.caption_regions:
            teacher = Teacher(cfg.pretrain.teacher, train_set.pool, device)
            labeler = RegionConceptLoss(model, teacher, train_set.pool, cfg, world, vocab)
        loss_module = RegionTextLoss(model, cfg, world, vocab, captions=labeler)
        if not run.train_text_tower:
            with torch.no_grad(), autocast():
                loss_module.text_emb = model.text.embed(loss_module.vocab).float()
    step_fn = loss_module if world == 1 else DistributedDataParallel(
        loss_module, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=run.seed, drop_last=True)
    batches_per_epoch = len(train_set) // world // per_rank
    if batches_per_epoch == 0:
        raise BadConfig(f"{len(train_set)} training images cannot fill one batch of {o.batch_size}")

    step, epoch, position, best = 0, 0, 0, None
    torch.manual_seed(run.seed + rank)  # augmentation and background sampling differ per process
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, position, best = ckpt["step"], ckpt["epoch"], ckpt["position"], ckpt.get("best")
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        # Each process continues its own random stream (flips, sampled regions); checkpoints
        # from another world size fall back to rank 0's.
        rng_ranks = ckpt.get("rng_per_rank") or []
        set_rng_state(rng_ranks[rank] if len(rng_ranks) == world else ckpt["rng"])
        if step >= o.max_steps and (out / "model.pt").is_file():
            return TrainResult(step=step, model=model, out_dir=out)  # finished: nothing to redo
    if rank == 0:
        dump_config(cfg, out / "config.yaml")

    def checkpoint(name: str) -> None:
        """Every process calls this (its RNG state is gathered); rank 0 writes."""
        states = [rng_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if rank == 0:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                         "epoch": epoch, "position": position, "best": best, "rng": states[0],
                         "rng_per_rank": states, "config": to_dict(cfg)}, out / name)

    def log(record: dict) -> None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def validate() -> None:
        nonlocal best
        if val is None:
            return
        with autocast():
            ap = evaluate(model, val, split, rank, world, images=run.eval_images)  # sharded: every process takes part
        _set_trainable(model, run)  # back to training modes
        key = "base" if "base" in ap else "overall"
        result.evals.append({"step": step, **ap})
        if rank == 0:
            log({"step": step, "val_AP50": {k: v for k, v in ap.items() if k != "R50@100"},
                 "val_R50@100": ap["R50@100"]})
            if progress:
                progress({"step": step, "eval": ap})
        if ap[key] is not None and (best is None or ap[key] > best):
            best = ap[key]
            checkpoint("best.pt")

    result = TrainResult(step=step, model=model, out_dir=out)
    feed = Feed(train_set, sampler, per_rank, run.seed, rank, run.num_workers, device, epoch, position)
    tick, seen, rate, dropped = time.perf_counter(), 0, 0.0, 0
    # Losses stay on the device until a log step: reading one every step would make the host
    # wait for the GPU to finish the step before it can queue the next.
    pending: list[torch.Tensor] = []
    value = float("nan")
    while step < o.max_steps:
        images, targets, lost = feed.next()
        dropped += lost  # boxes the data transforms left under a pixel
        epoch, position = feed.epoch, feed.position

        batch = ImageBatch.from_tensors(images)
        with autocast():
            losses, _ = step_fn(batch, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16: the loss is scaled so small gradients survive
        if o.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        scaler.step(optimizer)  # skips the step when a scaled gradient overflowed
        scaler.update()
        scheduler.step()
        step, seen = step + 1, seen + o.batch_size
        pending.append(loss.detach())

        logging = step % run.log_every == 0 or step == o.max_steps
        if logging:
            result.losses += _all_mean(torch.stack(pending), world)
            pending, value = [], result.losses[-1]
            rate = seen / max(1e-9, time.perf_counter() - tick)
        if rank == 0 and logging:
            log({"step": step, "loss": value, **{k: float(v.detach()) for k, v in losses.items()},
                 "lr": scheduler.get_last_lr()[0], "img_per_s": rate, "boxes_dropped": dropped,
                 "logit_scale": float(model.clip.logit_scale.detach().exp())})
        if step % run.log_every == 0:
            tick, seen, dropped = time.perf_counter(), 0, 0
        if rank == 0 and progress:
            progress({"step": step, "max_steps": o.max_steps, "loss": value,
                      "lr": scheduler.get_last_lr()[0], "img_per_s": rate})
        if run.eval_every and step % run.eval_every == 0 and step < o.max_steps:
            validate()
        if step % run.ckpt_every == 0 or step == o.max_steps:
            checkpoint("last.pt")

    validate()
    if rank == 0:
        model.eval()
        model.text.clear()
        # RPN-only training leaves the box head matched to the old backbone features: drop it.
        model.save(out / "model.pt", box_head=not (run.train_proposals and model.cfg.proposals.source == "rpn"))
        preset = to_dict(model.cfg)
        preset["checkpoint"] = str((out / "model.pt").resolve())
        preset["device"] = "auto"
        preset["regions"]["box_refinement"] = model.box_head is not None
        # Score with the temperature training learned (the checkpoint's logit_scale), as training did.
        preset["scoring"]["logit_scale"] = None
        out.joinpath("preset.yaml").write_text(
            "# Written by regionclip train: use with `regionclip detect --model THIS_FILE`.\n"
            + yaml.safe_dump(preset, sort_keys=False))
    if world > 1:
        dist.barrier()
    result.step = step
    return result
