"""Throughput of the detection pipeline, stage by stage, on synthetic images and labels.

The stages timed are ``RegionCLIP``'s own (``propose``, ``embed``, ``logits``, ``postprocess``
over one ``ImageBatch``), called as ``detect`` calls them. Warm-up iterations are excluded, and
the one-off text encoding is reported apart from the per-batch cost of looking up cached label
embeddings. The device is synchronised around every stage, so each stage's time is its own work
and not whatever was still queued.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .batch import ImageBatch
from .errors import BadInput
from .outputs import atomic_write_json, check_output_file
from .runtime import synchronize

STAGES = ("proposals", "regions", "text", "logits", "postprocess")
STAGE_NAMES = {
    "proposals": "propose",
    "regions": "embed (regions)",
    "text": "text lookup (cached)",
    "logits": "logits",
    "postprocess": "postprocess (scores + NMS)",
}


def parse_size(text: str) -> tuple[int, int]:
    """``"640x853"`` (height x width) -> ``(640, 853)``."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise BadInput(f"image size must look like HEIGHTxWIDTH, e.g. 640x853, but got '{text}'") from None
    if h < 32 or w < 32:
        raise BadInput(f"image size must be at least 32x32, but got {h}x{w}")
    return h, w


def check_settings(*, batch_size: int = 1, image_size: tuple[int, int] = (640, 853), num_labels: int = 1,
                   iters: int = 1, warmup: int = 0, num_proposals: int | None = None) -> None:
    """Raise ``BadInput`` for settings no benchmark can run with (callable before building a model)."""
    for name, value, least in (("batch size", batch_size, 1), ("number of labels", num_labels, 1),
                               ("iterations", iters, 1), ("warm-up iterations", warmup, 0),
                               ("number of proposals", 1 if num_proposals is None else num_proposals, 1)):
        if int(value) < least:
            raise BadInput(f"{name} must be at least {least}, but got {value}")
    h, w = image_size
    if h < 32 or w < 32:
        raise BadInput(f"image size must be at least 32x32, but got {h}x{w}")


def synthetic_images(batch_size: int, image_size: tuple[int, int], device: torch.device,
                     seed: int = 0) -> list[torch.Tensor]:
    """``batch_size`` seeded 3xHxW images in [0, 1] on ``device``.

    Coarse noise upsampled to size: blobs and edges rather than white noise, so the images
    look a little like photos to the convolutional stages. Random weights don't care, but
    pretrained ones would.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    coarse = torch.rand((batch_size, 3, max(2, h // 32), max(2, w // 32)), generator=g)
    images = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return [img.to(device) for img in images]


def synthetic_labels(num_labels: int) -> list[str]:
    return [f"object {i}" for i in range(num_labels)]


def device_name(device: torch.device) -> str:
    """A human name for ``device``: the GPU's, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def _quantiles(values: list[float]) -> dict[str, float]:
    """Median, p10 and p90 with linear interpolation (well defined for a single value too)."""
    s = sorted(values)

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"median": q(0.5), "p10": q(0.1), "p90": q(0.9)}


class _PeakMemory:
    """Peak device memory over a block.

    CUDA: ``max_memory_allocated`` (weights and activations, PyTorch's allocator only).
    CPU: growth of the process's peak RSS over the block. Linux lets a process reset its
    high-water mark through ``/proc/self/clear_refs``; without that, ``ru_maxrss`` growth is
    used, which reads 0 when an earlier phase (model loading) peaked higher.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = ""
        self.mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated (weights + activations)"
            return self
        try:
            self._start = _proc_status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            self._hwm = True
            self.kind = "CPU peak RSS growth over the timed loop (process-wide, not device memory)"
        except OSError:
            self._hwm = False
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.kind = "CPU ru_maxrss growth over the timed loop (0 if model loading peaked higher)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._hwm:
            self.mb = max(0, _proc_status_kb("VmHWM") - self._start) / 1024
        else:
            self.mb = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start) / 1024
        return False


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _one_batch(backend, batch: ImageBatch, labels: list[str]) -> tuple[dict, int]:
    """``TorchBackend.detect_batch``'s stages, each timed between device synchronisations.

    Returns ({stage: ms}, boxes in the batch).
    """
    model = backend.model
    device = model.device
    times: dict[str, float] = {}

    def timed(stage: str, fn: Callable):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times[stage] = (time.perf_counter() - start) * 1000
        return out

    boxes, objectness = timed("proposals", lambda: model.propose(batch))
    regions = timed("regions", lambda: model.embed(batch, boxes))
    text_emb = timed("text", lambda: model.text(labels))
    logits = timed("logits", lambda: model.logits(regions, text_emb))
    timed("postprocess", lambda: backend.postprocess(batch, boxes, objectness, logits, labels))
    return times, sum(len(b) for b in boxes)


def run_benchmark(
    model,
    *,
    batch_size: int = 1,
    image_size: tuple[int, int] = (640, 853),
    num_labels: int = 10,
    iters: int = 10,
    warmup: int = 2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    json_out: str | os.PathLike | None = None,
) -> dict:
    """Time ``model`` (a ``RegionCLIP`` or a torch ``Predictor``) on ``batch_size`` synthetic images of ``image_size`` (H, W) and ``num_labels`` labels.

    Label embeddings are encoded once before timing (``text_encode_ms``; 0 prompts encoded
    means they were already cached), so ``stages_ms["text"]`` is what a cached vocabulary of
    that size costs per batch. FLOPs are counted with ``FlopCounterMode`` over one full batch
    (the first warm-up batch, or an extra untimed one): matmuls and convolutions, not
    RoIAlign or NMS. ``progress(done, total)`` is called after every batch, warm-up included.

    Returns a JSON-ready dict: ``settings``, ``device``, ``device_name``, ``images_per_s``
    (from the median batch time), ``batch_ms`` and ``stages_ms[stage]`` as
    ``{median, p10, p90}`` over ``iters`` batches, ``text_encode_ms``,
    ``text_prompts_encoded``, ``boxes_per_image``, ``gflop_per_image``, ``achieved_tflops``,
    ``peak_memory_mb`` and ``memory_kind``; written to ``json_out`` too when given (checked first).
    """
    backend = getattr(model, "predictor", model).backend
    if not hasattr(backend, "postprocess"):
        raise BadInput("bench times the torch model's stages; an ONNX export has its own: examples/bench_onnx.py")
    model = backend.model
    if json_out is not None:
        check_output_file(json_out, "--json")
    check_settings(batch_size=batch_size, image_size=image_size, num_labels=num_labels, iters=iters,
                   warmup=warmup, num_proposals=model.cfg.proposals.num_proposals)
    h, w = image_size
    device = model.device
    batch = ImageBatch.from_tensors(synthetic_images(batch_size, (h, w), device, seed))
    labels = synthetic_labels(num_labels)
    total = warmup + iters
    done = 0

    def step():
        nonlocal done
        out = _one_batch(backend, batch, labels)
        done += 1
        if progress is not None:
            progress(done, total)
        return out

    with torch.inference_mode(), model.autocast():
        encoded_before = model.text.prompts_encoded
        synchronize(device)
        start = time.perf_counter()
        model.text(labels)
        synchronize(device)
        text_encode_ms = (time.perf_counter() - start) * 1000
        prompts = model.text.prompts_encoded - encoded_before

        # The first warm-up batch doubles as the FLOP count; the counter's per-op overhead
        # is harmless there and saves a full extra pass on slow devices.
        counter = FlopCounterMode(display=False)
        with counter:
            if warmup:
                step()
            else:
                _one_batch(backend, batch, labels)
        for _ in range(warmup - 1):
            step()
        runs, boxes = [], []
        with _PeakMemory(device) as memory:
            for _ in range(iters):
                synchronize(device)
                start = time.perf_counter()
                times, n_boxes = step()
                times["batch"] = (time.perf_counter() - start) * 1000
                runs.append(times)
                boxes.append(n_boxes)

    batch_ms = _quantiles([r["batch"] for r in runs])
    images_per_s = batch_size / (batch_ms["median"] / 1000)
    gflop = counter.get_total_flops() / 1e9 / batch_size
    cfg = model.cfg
    result = {
        "settings": {
            "clip_model": cfg.clip_model, "clip_pretrained": cfg.clip_pretrained,
            "detector": cfg.detector, "detector_weights": cfg.detector_weights,
            "mode": cfg.mode, "precision": cfg.precision,
            "num_proposals": cfg.proposals.num_proposals, "batch_size": batch_size,
            "image_size": [h, w], "num_labels": num_labels, "iters": iters, "warmup": warmup,
            "seed": seed,
        },
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "images_per_s": images_per_s,
        "batch_ms": batch_ms,
        "stages_ms": {s: _quantiles([r[s] for r in runs]) for s in STAGES},
        "text_encode_ms": text_encode_ms,
        "text_prompts_encoded": prompts,
        "boxes_per_image": sum(boxes) / (len(boxes) * batch_size),
        "gflop_per_image": gflop,
        "achieved_tflops": gflop * images_per_s / 1000,
        "peak_memory_mb": memory.mb,
        "memory_kind": memory.kind,
    }
    if json_out is not None:
        atomic_write_json(json_out, result)
    return result
