"""Device and precision, decided in one place.

Parameters stay fp32; reduced precision comes from autocast, so one checkpoint serves every
precision and the optimizer never sees half-precision master weights.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from .errors import BadInput

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise BadInput(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"device '{spec}' asked for but no CUDA device is visible: use device 'cpu' (--device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInput(
                f"device '{spec}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif device.type != "cpu":
        raise BadInput(f"unsupported device '{spec}': use auto, cpu, cuda or cuda:N")
    return device


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """Map ``fp32|bf16|fp16`` to a factory of autocast contexts for ``device``."""
    if precision not in PRECISIONS:
        raise BadInput(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise BadInput("fp16 needs a CUDA device: use precision 'bf16' or 'fp32' on the CPU (--precision)")
    dtype = PRECISIONS[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
