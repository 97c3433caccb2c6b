"""The training loop, read as detectron2's trainer reads: ``Trainer.__init__`` sets a run up
(data, model, optimizer, the stage's loss, resume), ``run_step`` is one optimizer step, and
``checkpoint`` / ``validate`` / ``log`` run at their intervals from ``run``. The stage's loss
module (``finetune.RegionTextLoss``, ``stages.ImageTextLoss``, ``stages.RegionConceptLoss``) is
the whole trainable graph, so DDP wraps just it. DDP comes from torchrun's environment (NCCL on
GPU, gloo on CPU); AMP from ``train.precision``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ..atomic import atomic_torch_save
from ..batch import ImageBatch
from ..box_head import BoxRefiner
from ..config import dump_config, to_dict
from ..data import CocoDetection, load_split
from ..detector import RegionCLIP
from ..errors import BadConfig
from ..eval_dataset import evaluate_model
from ..evaluate import first_images
from ..runtime import autocast_for, resolve_device
from ..weights import register_clip_config
from .config import TrainConfig, resolve_resume, stage_config
from .feed import Feed
from .finetune import RegionTextLoss
from .optim import build_model, optimizer_for, schedule, set_trainable
from .replay import WithReplay, replay_set
from .retention import Retention
from .stages import ImageTextLoss, RegionConceptLoss, Teacher, captioned
from .state import load_checkpoint, restore_schedule, rng_state, set_rng_state

Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # global mean loss of every step this process ran
    evals: list[dict] = field(default_factory=list)  # {"step", "base": AP50, "novel": AP50, "overall": AP50}
    model: RegionCLIP | None = None
    out_dir: Path | None = None
    retention: dict | None = None  # the retention report (retention.json), when retention.annotations is set


class Trainer:
    """One training run of ``cfg`` (one stage): build everything in ``__init__``, then ``run()``.

    Outputs in ``cfg.out_dir``: ``config.yaml`` (resolved), ``last.pt``/``best.pt`` (model,
    optimizer, scheduler, step, data position, RNG), ``metrics.jsonl``, and at the end
    ``model.pt`` (``RegionCLIP.save``) with ``preset.yaml`` for ``regionclip detect --model``.
    ``progress`` (rank 0 only) receives ``{"step", "max_steps", "loss", "lr", "img_per_s"}``
    after every step (``loss``: the latest logged one, NaN before the first log step) and
    ``{"step", "eval": {...}}`` after every evaluation. With ``retention.annotations``
    (``retention.py``): ``retention.json``, ``{"step", "retention": {"before": ...}}`` before the
    first step and ``{"step", "retention": report}`` at the end, whose measurement of the val
    set replaces the final validation; ``model.pt`` then holds the WiSE-FT mix when
    ``retention.wise_alpha`` < 1 (``last.pt``/``best.pt`` the weights as trained).
    """

    def __init__(self, cfg: TrainConfig, resume: str | os.PathLike | None = None,
                 progress: Progress | None = None) -> None:
        self.rank, self.world, cfg.model.device = _dist_init(cfg.model.device)
        if cfg.stage == "clip":  # whole images against captions: no proposals in the graph
            cfg.train.train_proposals = False
        self.cfg, self.progress, self.out = cfg, progress, Path(cfg.out_dir)
        o, run = cfg.optim, cfg.train
        if o.batch_size % self.world:
            raise BadConfig(f"optim.batch_size {o.batch_size} must be divisible by the {self.world} processes")
        self.per_rank = o.batch_size // self.world
        self._data()

        for name, arch in cfg.clip_configs.items():
            register_clip_config(name, arch)
        torch.manual_seed(run.seed)
        self.model = model = build_model(cfg.model, run)
        # The weights change from the first step: embeddings cached under the start's key must be
        # neither read nor written (the on-disk cache outlives this run).
        model.text.clear()
        model.clip_key = None
        model.proposals.detector.roi_heads.fg_bg_sampler.batch_size_per_image = cfg.loss.box_head_samples
        self.device = device = model.device
        if cfg.stage == "finetune" and cfg.loss.box_regression_weight > 0 and model.box_head is None:
            model.box_head = BoxRefiner(model.regions.embed_dim(), cfg.loss.box_head_hidden).to(device)
        precision = run.precision if run.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        self.autocast = autocast_for(precision, device)
        # fp16's narrow range needs loss scaling; bf16 and fp32 run with the scaler disabled.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.params = set_trainable(model, run)
        self.optimizer = optimizer_for(self.params, o, model.box_head)
        self.scheduler = schedule(self.optimizer, o.warmup_steps, o.max_steps)
        self.retention = self._retention()
        self._replay(resumed=resume is not None)
        self.loss_module = self._loss_module()
        self.step_fn = self.loss_module if self.world == 1 else DistributedDataParallel(
            self.loss_module, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)

        self.step, epoch, position, self.best = 0, 0, 0, None
        torch.manual_seed(run.seed + self.rank)  # background sampling differs per process
        self.resumed = resume is not None
        if resume is not None:
            self.step, epoch, position, self.best = self._restore(resume)
        self.result = TrainResult(step=self.step, model=model, out_dir=self.out)
        if len(self.train_set) // self.world // self.per_rank == 0:
            raise BadConfig(f"{len(self.train_set)} training images cannot fill one batch of {o.batch_size}")
        sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=run.seed, drop_last=True)
        self.feed = Feed(self.train_set, sampler, self.per_rank, run.seed, self.rank, run.num_workers, device,
                         epoch, position)
        # Losses stay on the device until a log step: reading one every step would make the host
        # wait for the GPU to finish the step before it can queue the next.
        self._pending: list[torch.Tensor] = []
        self._last_loss, self._tick, self._seen, self._rate, self._dropped = float("nan"), time.perf_counter(), 0, 0.0, 0

    # -- set-up -------------------------------------------------------------------------------

    def _data(self) -> None:
        cfg, split_file = self.cfg, self.cfg.data.split
        self.split = split = load_split(split_file) if split_file else None
        train_cats = (split["base"] if cfg.data.use_base_only else split["base"] + split["novel"]) if split else None
        self.train_set = CocoDetection(cfg.data.train_annotations, cfg.data.train_images, train_cats, train=True,
                                       max_side=cfg.data.max_side, hflip_prob=cfg.data.hflip_prob,
                                       negatives=cfg.data.negative_categories)
        if cfg.stage != "finetune" or cfg.loss.caption_regions:
            self.train_set = captioned(self.train_set, cfg, split)
        self.val = None
        if cfg.data.val_annotations and cfg.stage != "clip":  # AP means nothing before boxes
            self.val = CocoDetection(cfg.data.val_annotations, cfg.data.val_images,
                                     split["base"] + split["novel"] if split else None)

    def _loss_module(self) -> torch.nn.Module:
        cfg, model, world, vocab = self.cfg, self.model, self.world, self.train_set.category_names
        if cfg.stage == "clip":
            return ImageTextLoss(model, cfg, world)
        if cfg.stage == "region_pretrain":
            teacher = Teacher(cfg.pretrain.teacher, self.train_set.pool, self.device)
            return RegionConceptLoss(model, teacher, self.train_set.pool, cfg, world, vocab)
        labeler = None
        if cfg.loss.caption_regions:
            teacher = Teacher(cfg.pretrain.teacher, self.train_set.pool, self.device)
            labeler = RegionConceptLoss(model, teacher, self.train_set.pool, cfg, world, vocab)
        retain = self.retention.distiller(model, cfg.train.train_text_tower) if self.retention else None
        loss = RegionTextLoss(model, cfg, world, vocab, captions=labeler, retain=retain)
        if not cfg.train.train_text_tower:
            with torch.no_grad(), self.autocast():
                loss.text_emb = model.text.embed(loss.vocab).float()
        return loss

    def _retention(self) -> Retention | None:
        """``retention.annotations`` set: the report's sets, scorer and the start weights."""
        rc = self.cfg.retention
        if not rc.annotations:
            return None

        def score(model, dataset, split):
            with self.autocast():
                ap = evaluate(model, dataset, split, self.rank, self.world, images=rc.eval_images, top_k=rc.top_k,
                              distractors=rc.distractors)
            return {k: v for k, v in ap.items() if k not in EXTRA}

        return Retention(rc, self.model, self.val, self.split, score, self.out, write=self.rank == 0)

    def _replay(self, resumed: bool) -> None:
        """``retention.replay_images``: the start model's pseudo-labelled images join the training
        set (``replay.py``), labelled now, before any step (a resumed run reads its labels back)."""
        rc, data = self.cfg.retention, self.cfg.data
        if not rc.replay_images:
            return
        with self.autocast():
            replay = replay_set(self.model, rc, self.retention.old_names, self.out, self.cfg.train.seed, resumed,
                                self.rank, dist.barrier if self.world > 1 else None, data.max_side, data.hflip_prob)
        self.train_set = WithReplay(self.train_set, replay)
        set_trainable(self.model, self.cfg.train)  # back to training modes

    def _restore(self, path) -> tuple[int, int, int, float | None]:
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        restore_schedule(self.scheduler, ckpt["scheduler"], ckpt["step"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        # Each process continues its own random stream (sampled regions); checkpoints from
        # another world size fall back to rank 0's.
        rng_ranks = ckpt.get("rng_per_rank") or []
        set_rng_state(rng_ranks[self.rank] if len(rng_ranks) == self.world else ckpt["rng"])
        return ckpt["step"], ckpt["epoch"], ckpt["position"], ckpt.get("best")

    # -- the step and what runs between steps ---------------------------------------------------

    def run_step(self) -> None:
        """One optimizer step on the next batch."""
        images, targets, dropped = self.feed.next()
        self._dropped += dropped  # boxes the data transforms left under a pixel
        with self.autocast():
            self.losses, _ = self.step_fn(ImageBatch.from_tensors(images), targets)
        loss = sum(self.losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # fp16: the loss is scaled so small gradients survive
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)  # skips the step when a scaled gradient overflowed
        self.scaler.update()
        self.scheduler.step()
        self.step, self._seen = self.step + 1, self._seen + self.cfg.optim.batch_size
        self._pending.append(loss.detach())

    def log(self) -> None:
        """Every process: the pending losses' global means into ``result.losses``; rank 0: a
        ``metrics.jsonl`` line with the step's losses, lr, img/s and dropped boxes."""
        self.result.losses += _all_mean(torch.stack(self._pending), self.world)
        self._pending, self._last_loss = [], self.result.losses[-1]
        self._rate = self._seen / max(1e-9, time.perf_counter() - self._tick)
        if self.rank == 0:
            self._write({"step": self.step, "loss": self._last_loss,
                         **{k: float(v.detach()) for k, v in self.losses.items()},
                         "lr": self.scheduler.get_last_lr()[0], "img_per_s": self._rate,
                         "boxes_dropped": self._dropped,
                         "logit_scale": float(self.model.clip.logit_scale.detach().exp())})
        self._tick, self._seen, self._dropped = time.perf_counter(), 0, 0

    def checkpoint(self, name: str) -> None:
        """Every process calls this (its RNG state is gathered); rank 0 writes ``OUT/name``."""
        states = [rng_state()]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, rng_state())
        if self.rank == 0:
            atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                         "step": self.step, "epoch": self.feed.epoch, "position": self.feed.position,
                         "best": self.best, "rng": states[0], "rng_per_rank": states, "config": to_dict(self.cfg)},
                        self.out / name)

    def validate(self) -> None:
        """Val AP50 and proposal recall (every process takes its share); ``best.pt`` when the
        base (else overall) AP50 is the best yet."""
        if self.val is None:
            return
        with self.autocast():
            ap = evaluate(self.model, self.val, self.split, self.rank, self.world, images=self.cfg.train.eval_images,
                          short_lists=self.cfg.train.eval_short_lists)
        set_trainable(self.model, self.cfg.train)  # back to training modes
        key = "base" if "base" in ap else "overall"
        self.result.evals.append({"step": self.step, **ap})
        if self.rank == 0:
            self._write({"step": self.step, "val_AP50": {k: v for k, v in ap.items() if k not in EXTRA},
                         **{f"val_{k}": ap[k] for k in EXTRA if k in ap}})
            if self.progress:
                self.progress({"step": self.step, "eval": ap})
        if ap[key] is not None and (self.best is None or ap[key] > self.best):
            self.best = ap[key]
            self.checkpoint("best.pt")

    def _retention_event(self, report: dict) -> None:
        if self.rank == 0:
            self._write({"step": self.step, "retention": report})
            if self.progress:
                self.progress({"step": self.step, "retention": report})

    def _write(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        o, run = self.cfg.optim, self.cfg.train
        if self.resumed and self.step >= o.max_steps and (self.out / "model.pt").is_file():
            return self.result  # finished: nothing to redo
        if self.rank == 0:
            dump_config(self.cfg, self.out / "config.yaml")
        if self.retention is not None:
            self._retention_event({"before": self.retention.before(self.model)})
            set_trainable(self.model, run)  # back to training modes
        while self.step < o.max_steps:
            self.run_step()
            last = self.step == o.max_steps
            if self.step % run.log_every == 0 or last:
                self.log()
            if self.rank == 0 and self.progress:
                self.progress({"step": self.step, "max_steps": o.max_steps, "loss": self._last_loss,
                               "lr": self.scheduler.get_last_lr()[0], "img_per_s": self._rate})
            if run.eval_every and self.step % run.eval_every == 0 and not last:
                self.validate()
            if self.step % run.ckpt_every == 0 or last:
                self.checkpoint("last.pt")
        if self.retention is None:
            self.validate()
        else:  # the report's "after" is the final validation (WiSE-FT mixes the weights first)
            report = self.retention.after(self.model)
            self.result.retention = report
            if "new" in report["after"]:
                self.result.evals.append({"step": self.step, **report["after"]["new"]})
            self._retention_event(report)
        if self.rank == 0:
            self._save_model()
        if self.world > 1:
            dist.barrier()
        self.result.step = self.step
        return self.result

    def _save_model(self) -> None:
        """``model.pt`` and the ``preset.yaml`` that loads it."""
        model, run = self.model, self.cfg.train
        model.eval()
        model.text.clear()
        # RPN-only training leaves the box head matched to the old backbone features: drop it.
        model.save(self.out / "model.pt", box_head=not (run.train_proposals and model.cfg.proposals.source == "rpn"))
        preset = to_dict(model.cfg)
        preset["checkpoint"] = str((self.out / "model.pt").resolve())
        if preset["labels"]:  # a closed-set model now knows the names it was trained on too
            names = self.train_set.category_names
            preset["labels"] = preset["labels"] + [n for n in names if n not in preset["labels"]]
        preset["device"] = "auto"
        preset["regions"]["box_refinement"] = model.box_head is not None
        # Score with the temperature training learned (the checkpoint's logit_scale), as training did.
        preset["scoring"]["logit_scale"] = None
        self.out.joinpath("preset.yaml").write_text(
            "# Written by regionclip train: use with `regionclip detect --model THIS_FILE`.\n"
            + yaml.safe_dump(preset, sort_keys=False))


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, progress: Progress | None = None) -> TrainResult:
    """Run (or resume from a ``last.pt``) the training described by ``cfg`` (``Trainer`` has the
    outputs and ``progress`` events). ``cfg.stage`` picks what trains (``finetune``: boxes;
    ``clip`` and ``region_pretrain``: see ``stages.py``); a config with ``stages`` runs each in
    turn (``run_stages``)."""
    resume = resolve_resume(cfg, resume)  # a mistyped path is an error, never a fresh start
    if cfg.stages:
        return run_stages(cfg, resume, progress)
    return Trainer(cfg, resume, progress).run()


def run_stages(cfg: TrainConfig, resume: str | os.PathLike | None = None,
               progress: Progress | None = None) -> TrainResult:
    """Each of ``cfg.stages`` in turn, each in ``OUT/<name>/`` starting from the previous one's
    model. With ``resume`` (any value), a stage continues from its own ``last.pt`` when it has one
    (a finished one does nothing). The last stage's preset is copied to ``OUT/preset.yaml``."""
    stages, previous = [], None
    for i in range(len(cfg.stages)):
        stages.append(stage_config(cfg, i, previous))
        previous = Path(stages[-1].out_dir)
    # Every stage's data before the first starts: a set made for a later stage only (the demo's
    # "others") would otherwise be missed an hour into the run.
    for entry, stage in zip(cfg.stages, stages):
        for key in ("train_annotations", "train_images"):
            path = getattr(stage.data, key)
            if not Path(path).exists():
                raise BadConfig(f"stage {entry['name']}: data.{key} {path} does not exist; make it first "
                                "(the training YAML's header has the commands)")
    result = None
    for entry, stage in zip(cfg.stages, stages):
        last = Path(stage.out_dir) / "last.pt"
        name = entry["name"]

        def tagged(event: dict, name=name) -> None:
            progress({**event, "stage": name})

        result = train(stage, resume=last if resume is not None and last.is_file() else None,
                       progress=tagged if progress else None)
    out = Path(cfg.out_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "preset.yaml").write_text((previous / "preset.yaml").read_text())
    result.out_dir = out
    return result


# What `evaluate` returns beside the AP50 per part.
EXTRA = ("R50@100", "short_lists")


def evaluate(model: RegionCLIP, val: CocoDetection, split: dict | None, rank: int = 0,
             world: int = 1, batch_size: int = 8, images: int | None = None,
             short_lists: int = 0, top_k: int = 3, distractors=None) -> dict[str, float | None]:
    """Val AP50 (percent) overall and, with a split, on base and novel: ``regionclip eval``'s own
    code; under ``"R50@100"`` the class-agnostic proposal recall at IoU 0.5 within the top 100
    per part (``regionclip/recall.py``). With ``world`` > 1 every process runs its share of the
    batches and the detections are gathered before scoring; every process gets the same figures
    as one process would. ``images`` (``train.eval_images``) scores the val images with the
    lowest ids only, the same ones every time. ``short_lists`` N > 0 (one process only) adds
    ``"short_lists"``: the mean precision, recall, AP50 and foreign-label rate of N seeded 3-name
    lists (``regionclip/shortlists.py``). ``top_k`` and ``distractors`` as ``regionclip eval`` takes them."""
    model.eval()
    model.text.clear()  # the text tower may have changed since the last cached embeddings
    model.clip_key = None  # nor may distractor embeddings be cached (regionclip/distractors.py)
    model.predictor.backend.__dict__.pop("_distractor_memory", None)
    gather = None
    if world > 1:
        def gather(part):
            parts = [None] * world
            dist.all_gather_object(parts, part)
            return parts
    report, _ = evaluate_model(model, first_images(val.coco, images), val.images_dir, split=split, vocabulary=val.category_names,
                               batch_size=batch_size, workers=0, shard=(rank, world), gather=gather,
                               top_k=top_k, distractors=distractors, short_lists=(short_lists, 3, 0) if short_lists and world == 1 else None)
    ap = {part: figures["AP50"] for part, figures in report["map"].items() if part in ("overall", "base", "novel")}
    out = {**ap, "R50@100": {part: row["R50@100"] for part, row in report["proposal_recall"].items()}}
    if "short_lists" in report:
        out["short_lists"] = report["short_lists"]["mean"]
    return out


def _dist_init(device_spec: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_spec)  # cuda:{LOCAL_RANK} under torchrun, made the current device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1 and device.type == "cuda":
        device_spec = str(device)
    return (dist.get_rank() if world > 1 else 0), world, device_spec


def _all_mean(x: torch.Tensor, world: int) -> list[float]:
    """Per-process values ``x`` (a 1-D tensor, e.g. the losses of the steps since the last log)
    -> their means over the processes, on the host: the one place a step's loss leaves the device.
    NCCL reduces CUDA tensors, gloo CPU ones: ``x`` lives where its process trains."""
    x = x.double()
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x.tolist()
