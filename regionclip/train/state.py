"""Training state: RNG capture, reading checkpoints, restoring the schedule (checkpoints are
written with ``regionclip.atomic.atomic_torch_save``)."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from ..errors import BadConfig


def restore_schedule(scheduler: LRScheduler, state: dict[str, Any], step: int) -> None:
    """Load a checkpoint's scheduler state. One written before the schedule became torchvision-
    style ``SequentialLR(LinearLR, CosineAnnealingLR)`` (a ``LambdaLR``'s state, the same lr
    curve) is met by stepping the new schedule ``step`` times."""
    if set(state) >= set(scheduler.state_dict()):
        scheduler.load_state_dict(state)
        return
    with warnings.catch_warnings():  # "step() before optimizer.step()": no optimizer step is due here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint written by the loop (``weights_only``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise BadConfig(f"resume checkpoint not found: {path} (pass OUT_DIR/last.pt of an earlier run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadConfig(f"{path}: not a readable training checkpoint ({type(exc).__name__})") from None
    missing = {"model", "optimizer", "scheduler", "step"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise BadConfig(f"{path}: not a training checkpoint (missing {sorted(missing)}); use last.pt or best.pt of a run")
    return ckpt
