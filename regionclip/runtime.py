"""Device and precision, decided in one place.

Parameters stay fp32; reduced precision comes from autocast, so one checkpoint serves every
precision and the optimizer never sees half-precision master weights.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager

import torch

from .errors import BadInput

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def local_rank() -> int | None:
    """This process's GPU slot on its machine, as launchers set it (``LOCAL_RANK``: torchrun,
    ``torch.distributed.launch``, accelerate); None when unset."""
    value = os.environ.get("LOCAL_RANK")
    if value is None or not value.strip():
        return None
    try:
        rank = int(value)
    except ValueError:
        raise BadInput(f"LOCAL_RANK={value!r} must be an integer (torchrun sets it)") from None
    if rank < 0:
        raise BadInput(f"LOCAL_RANK={rank} must be 0 or more")
    return rank


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks a CUDA device when there is one, else the CPU; ``cuda:N`` is device N.

    A bare ``cuda`` (or ``auto`` on a GPU machine) means this process's GPU: ``cuda:{LOCAL_RANK}``
    under a launcher that sets ``LOCAL_RANK`` (one process per GPU), else the current device. A
    CUDA device is also made the current one (``torch.cuda.set_device``), so whatever allocates
    on a bare ``cuda`` (NCCL's buffers, a library's scratch space) lands on it too; without that,
    eight ranks of one machine all allocate on GPU 0.
    """
    spec = (spec or "auto").strip().lower()
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)
    except RuntimeError:
        raise BadInput(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise BadInput(f"unsupported device '{spec}': use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BadInput(f"device '{spec}' asked for but no CUDA device is visible: use device 'cpu' (--device cpu)")
    count, local = torch.cuda.device_count(), local_rank()
    if device.index is None and local is not None:
        if local >= count:
            raise BadInput(f"LOCAL_RANK={local} but {count} CUDA device(s) visible: start at most {count} "
                           "process(es) per machine (torchrun --nproc_per_node), or check CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local)
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index >= count:
        raise BadInput(f"device '{spec}' does not exist: {count} CUDA device(s) visible")
    torch.cuda.set_device(device)
    return device


def describe_device(device: torch.device) -> str:
    """``device`` and where its index came from, for a process's log line."""
    local = local_rank()
    if device.type == "cuda" and local is not None and device.index == local:
        return f"{device} (LOCAL_RANK={local})"
    return str(device)


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
