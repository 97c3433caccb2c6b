"""Tiny models and generated images shared by the tests (CPU, seconds)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# Before torch loads OpenMP: its worker threads then sleep at barriers instead of spinning.
# On a machine where another process holds the cores, spinning threads starve the one doing
# the work; measured here under load (2 cores, load average 10): a MobileNetV3-FPN backbone
# pass took 13.4 s with the default policy and 0.3 s with PASSIVE.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _scratch_in_memory(root: str = "/dev/shm", need_gb: float = 4.0) -> None:
    """Put pytest's tmp_path folders on a tmpfs when the user has not chosen a temp folder.

    The training tests write checkpoints of 55 MB, several a test. When they were 110 MB, on this
    project's machine (ext4 on a virtual disk) test_train.py spent 17.7 s of CPU in the kernel
    writing them, 4.8 s on /dev/shm; the whole suite went from 176 s to 154 s (2026-12-06). pytest's
    tmp_path_retention_policy ("failed", pyproject) removes a passed test's folder at once, so
    little memory stays in use (1.4 GB at the peak of a run)."""
    if os.environ.get("PYTEST_DEBUG_TEMPROOT") or os.environ.get("TMPDIR"):
        return
    try:
        stat = os.statvfs(root)
    except OSError:
        return
    if os.access(root, os.W_OK) and stat.f_bavail * stat.f_frsize >= need_gb * 2**30:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = root


_scratch_in_memory()

# On-disk embedding caches (the demo's distractors: regionclip/distractors.py) go to a folder of this
# run, not the user's ~/.cache: tests never read what an earlier run or a real user left there.
if "REGIONCLIP_CACHE" not in os.environ:
    import tempfile

    os.environ["REGIONCLIP_CACHE"] = tempfile.mkdtemp(prefix="regionclip-cache-",
                                                      dir=os.environ.get("PYTEST_DEBUG_TEMPROOT"))

import numpy as np
import pytest

if TYPE_CHECKING:
    from regionclip import RegionCLIP


def pytest_configure(config) -> None:
    """Torch is imported where tests run: in each xdist worker, or in a run without workers
    (``-n 0``). xdist's controller only hands tests out, and importing torch, torchvision and
    regionclip there cost it 4 s of CPU at every start."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker or not config.getoption("numprocesses", None):
        import torch

        from regionclip.weights import register_clip_config

        for name, cfg in TINY_CONFIGS.items():
            register_clip_config(name, cfg)
        if worker:  # two workers (pyproject's addopts): one thread each keeps both cores busy
            torch.set_num_threads(1)


def shrink_before_fork() -> None:
    """Hand the memory this process has freed back to the OS before forking workers from it.

    A pytest worker grows to 2-3 GB over the suite (freed tensors stay in glibc's heap), and a
    fork from it pays for those pages in the kernel: the DDP resume test spent 8-10 s there.
    ``malloc_trim`` returns the free heap pages; it is glibc's, so elsewhere this does nothing."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_ranks(worker, args: tuple, nprocs: int = 2, minutes: int = 10) -> None:
    """``worker(rank, *args)`` in ``nprocs`` processes; wait for all, fail (killing them) after
    ``minutes``: a hang guard, not a speed check. Forked where the platform can: the workers skip
    a fresh interpreter's imports (seconds each on a loaded machine); each sets one torch thread
    before any work, so the parent's OpenMP pool is never used after the fork."""
    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    shrink_before_fork()
    workers = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method=method)
    for _ in range(minutes * 12):
        if workers.join(timeout=5):
            return
    for process in workers.processes:
        process.kill()
    pytest.fail(f"{nprocs} worker processes still running after {minutes} minutes")


# Tiny open_clip architectures; the text side keeps the standard tokenizer (vocab 49408, ctx 77).
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    "test-vit-tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
        "text_cfg": TINY_TEXT,
    },
    # image_size 224 so the pool path can be checked against encode_image at CLIP's own size.
    "test-rn-tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": TINY_TEXT,
    },
}
TINY_DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"
TINY_PROPOSALS = {"box_head_width": 16}


def tiny_model(arch: str = "vit", mode: str = "crop", seed: int = 0, **overrides) -> RegionCLIP:
    """A random-initialised tiny RegionCLIP on the CPU, deterministic for a seed. Its detector's
    second stage is 16 wide (``TINY_PROPOSALS``): torchvision's 1024 holds 12.8M of the detector's
    19M weights, which every save, load and hash of a test model would pay for."""
    import torch

    from regionclip import RegionCLIP

    torch.manual_seed(seed)
    return RegionCLIP(
        clip_model="test-vit-tiny" if arch == "vit" else "test-rn-tiny",
        clip_pretrained="none",
        detector=TINY_DETECTOR,
        detector_weights="none",
        mode=mode,
        **{"device": "cpu", **overrides, "proposals": {**TINY_PROPOSALS, **overrides.get("proposals", {})}},
    )


@pytest.fixture(scope="session")
def models():
    """Cache of tiny models keyed by (arch, mode); don't mutate them in tests."""
    cache: dict[tuple[str, str], RegionCLIP] = {}

    def get(arch: str = "vit", mode: str = "crop") -> RegionCLIP:
        if (arch, mode) not in cache:
            cache[(arch, mode)] = tiny_model(arch, mode)
        return cache[(arch, mode)]

    return get


def shapes_image(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 RGB image with a few filled shapes on noise."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    cv2.circle(img, (w // 4, h // 3), max(4, min(h, w) // 8), (255, 0, 0), -1)
    cv2.rectangle(img, (w // 2, h // 2), (w // 2 + w // 5, h // 2 + h // 5), (0, 255, 0), -1)
    return img


@pytest.fixture
def image() -> np.ndarray:
    return shapes_image()


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> dict:
    """One small generated shapes set for the session (16 train, 4 val, 64x64 px, seed 0):
    ``make_shapes``' paths. Tests read it and never write into it."""
    from regionclip.data import make_shapes

    return make_shapes(tmp_path_factory.mktemp("tiny_shapes"), n_train=16, n_val=4, seed=0, image_size=(64, 64))
