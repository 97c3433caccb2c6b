"""Training state on disk: atomic checkpoint writes, RNG capture, the learning-rate schedule."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BadConfig


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from 0, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``.

    A crash or full disk mid-write leaves the previous ``path`` untouched; the partial temp
    file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
