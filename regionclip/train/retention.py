"""Fine-tuning that keeps the rest: what a fine-tune costs the starting model's own vocabulary, and
two ways to pay less.

- ``Retention``: the run's retention report. Before the first step and after the last, AP50 on a
  held-out set the user keeps (labelled in the starting model's own names) beside AP50 on the
  run's validation set (the new classes), both scored the same way; ``OUT/retention.json`` and a
  ``metrics.jsonl`` line.
- WiSE-FT (Wortsman et al. 2022): the written model is ``(1 - a) * start + a * fine-tuned``,
  weight by weight (``retention.wise_alpha``; ``interpolate`` does it for any ``a``).
- ``OldNamesDistill``: KL from the starting model's region scores over its own names (and
  background) to the student's, on every region a step trains on (``retention.distill_weight``):
  the new names are outside that softmax, so they learn freely while the old ones keep their ranks.
- Replay (``replay.py``): images of the old world labelled by the starting model before the first
  step train beside the new ones (``retention.replay_images``).

A frozen text tower is ``train.train_text_tower: false`` (nothing here).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..batch import ImageBatch
from ..data import CocoDetection, load_split
from ..detector import RegionCLIP
from .losses import distill_loss


@dataclass
class RetentionConfig:
    # The held-out set: a COCO instances JSON labelled in the starting model's own names (for the
    # demo, a `make-shapes` val set), and its image folder. None: no retention report.
    annotations: str | None = None
    images: str | None = None
    split: str | None = None  # its base/novel YAML: reported separately (None: overall only)
    # Labels per box in the report's evaluations (`regionclip eval --top-k`): 1, one name per box.
    top_k: int = 1
    # Names scored beside each set's own (`eval --distractors`). "none": before and after score
    # exactly the same list; the default preset distractors would change with the model's labels.
    distractors: Any = "none"
    eval_images: int | None = None  # the N images with the lowest ids of each set; None: all
    # WiSE-FT: the written model is (1 - a) * start + a * fine-tuned. 1: the fine-tuned weights.
    wise_alpha: float = 1.0
    # With wise_alpha < 1, also score the fine-tuned weights before mixing (two more evaluations).
    report_unmixed: bool = True
    # KL to the starting model's scores over its own names (the held-out set's categories) on
    # every region of a step; 0: off.
    distill_weight: float = 0.0
    # Replay (replay.py): a folder (or glob) of images of the starting model's own world, e.g. a
    # few of the old training set, never the held-out set (the report would then score images
    # the run trained on). None: off.
    replay_images: str | None = None
    # How many of them are drawn (seeded by train.seed) and labelled before the first step: they
    # join the training set, so a batch holds them in proportion (50 beside 50 new: half).
    replay_count: int = 50
    # A detection of the old names (one per box, no distractors) becomes a box at this score or
    # more. Below it the object is unlabelled and trains as background: high enough that the
    # labels are right, low enough that few real objects go unlabelled.
    replay_threshold: float = 0.5


# Evaluates a model on a set: (model, CocoDetection, split or None) -> {"overall"/"base"/"novel": AP50}.
Evaluate = Callable[[RegionCLIP, CocoDetection, "dict | None"], dict]


def interpolate(model: RegionCLIP, start: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT in place: every floating-point entry of ``model``'s state that ``start`` (a state
    dict of the same model before fine-tuning) also holds, with the same shape, becomes
    ``(1 - alpha) * start + alpha * current``; the rest (a head the run added, step counters) stay."""
    seen = set()  # a module reachable by two paths (the CLIP under the region encoder) is mixed once
    with torch.no_grad():
        for name, value in model.state_dict().items():
            old = start.get(name)
            if old is None or not value.is_floating_point() or old.shape != value.shape or value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
            value.copy_(torch.lerp(old.to(value.device, value.dtype), value, alpha))


class OldNamesDistill:
    """The starting model, frozen, as a teacher of its own names' scores (not a submodule of the
    loss: DDP and the optimizer never see its weights)."""

    def __init__(self, teacher: RegionCLIP, names: list[str], weight: float, text_trains: bool):
        self.teacher = teacher.eval().requires_grad_(False)
        self.names, self.weight, self.text_trains = names, weight, text_trains
        with torch.no_grad():
            self.teacher_text = teacher.text.embed(names).float()
        self.student_text: torch.Tensor | None = None

    def __call__(self, student: RegionCLIP, batch: ImageBatch, boxes: list[torch.Tensor],
                 regions: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The weighted mean KL over the (sum N, D) unit ``regions`` of per-image ``boxes``."""
        if self.text_trains:
            text = student.text.embed(self.names)
        else:  # a frozen text tower: embedded once
            if self.student_text is None:
                with torch.no_grad():
                    self.student_text = student.text.embed(self.names).float()
            text = self.student_text
        with torch.no_grad():
            t = self.teacher.logits(self.teacher.embed(batch, boxes), self.teacher_text, background=True).float()
        s = student.logits(regions, text, background=True, scale=scale).float()
        return self.weight * distill_loss(s, t).mean()


class Retention:
    """The retention report of one run (and the start weights WiSE-FT mixes with).

    ``new``: the run's validation set (None: only the held-out set is reported) with its split.
    ``evaluate`` scores a model on a set (the training loop's own validation code). ``out``: the
    run folder; ``write`` says whether this process writes (rank 0)."""

    FILE = "retention.json"

    def __init__(self, cfg: RetentionConfig, model: RegionCLIP, new: CocoDetection | None, new_split: dict | None,
                 evaluate: Evaluate, out: Path, write: bool = True):
        self.cfg, self.new, self.new_split, self.evaluate, self.out, self.write = cfg, new, new_split, evaluate, out, write
        self.held = CocoDetection(cfg.annotations, cfg.images)
        self.held_split = load_split(cfg.split) if cfg.split else None
        # The start weights, on the host: WiSE-FT's other end, and "before" for a resumed run.
        self.start = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.report: dict[str, Any] = self._read()

    @property
    def old_names(self) -> list[str]:
        """The starting model's names the report keeps: the held-out set's categories."""
        return self.held.category_names

    def distiller(self, model: RegionCLIP, text_trains: bool) -> OldNamesDistill | None:
        """The teacher for ``distill_weight`` > 0: a frozen copy of ``model`` as it starts."""
        if self.cfg.distill_weight <= 0:
            return None
        return OldNamesDistill(copy.deepcopy(model), self.old_names, self.cfg.distill_weight, text_trains)

    def measure(self, model: RegionCLIP) -> dict[str, dict]:
        """AP50 of ``model`` on the held-out set and on the new classes' val set."""
        out = {"held_out": self.evaluate(model, self.held, self.held_split)}
        if self.new is not None:
            out["new"] = self.evaluate(model, self.new, self.new_split)
        return out

    def before(self, model: RegionCLIP) -> dict[str, dict]:
        """The start model's figures (kept from an earlier call of the same run folder: a resumed
        run is measured with the start weights put back for the time of it)."""
        if "before" not in self.report:
            now = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.start, strict=False)
            self.report["before"] = self.measure(model)
            model.load_state_dict(now)
            self._save()
        return self.report["before"]

    def after(self, model: RegionCLIP) -> dict[str, Any]:
        """Mix ``model`` with the start weights (``wise_alpha``), measure it, write the report."""
        alpha = self.cfg.wise_alpha
        if alpha < 1 and self.cfg.report_unmixed:
            self.report["fine_tuned"] = self.measure(model)
        if alpha < 1:
            interpolate(model, self.start, alpha)
        self.report["after"] = self.measure(model)
        self.report["wise_alpha"] = alpha
        self.report["kept"] = kept(self.report["before"]["held_out"], self.report["after"]["held_out"])
        self.report["settings"] = {"held_out": self.cfg.annotations, "top_k": self.cfg.top_k,
                                   "distractors": self.cfg.distractors, "eval_images": self.cfg.eval_images,
                                   "distill_weight": self.cfg.distill_weight,
                                   "replay_images": self.cfg.replay_images, "replay_count": self.cfg.replay_count,
                                   "replay_threshold": self.cfg.replay_threshold}
        self._save()
        return self.report

    def _read(self) -> dict[str, Any]:
        path = self.out / self.FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save(self) -> None:
        if self.write:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / self.FILE).write_text(json.dumps(self.report, indent=2) + "\n")


def kept(before: dict, after: dict) -> dict[str, float | None]:
    """Per part (overall, base, novel), the share of ``before``'s AP50 that ``after`` keeps."""
    return {part: (after[part] / before[part] if before.get(part) and after.get(part) is not None else None)
            for part in before if part in ("overall", "base", "novel")}
