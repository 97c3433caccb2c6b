"""Is the training step fed? Seconds per step with the loader's workers decoding a batch ahead,
against the same steps with every batch already decoded in memory (the model alone).

    python benchmarks/bench_loading.py [--workers 2] [--steps 14] [--warmup 4] [--repeats 3] [--json F]

Generates ``--images`` shapes images (JPEG, 192-320 px, as the demo trains on) in a temporary
folder, then runs the demo recipe's first stage (``configs/train/shapes_demo.yaml``, stage
``boxes``: the tiny CLIP and MobileNet Faster R-CNN, everything training, batch 8) three times with
the same seed and flips off, so the three runs compute the same steps:

- ``model only``: every sample decoded before the clock starts; the loader hands out tensors;
- ``workers W``: what training does, ``train.num_workers: W`` processes decoding ahead;
- ``workers 0``: decoding inside the step (the default before ``num_workers`` became 2).

Step time is the mean over the steps after ``--warmup``; with ``--repeats`` the three runs take
turns and each keeps its median, so a neighbour's load spreads over all three. The target
(issue 20): workers 2 within 1.1x of model only, i.e. loading hidden behind the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from regionclip.data import CocoDetection, make_shapes
from regionclip.train import load_train_config, train
from regionclip.train.config import stage_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "shapes_demo.yaml"


class InMemory(CocoDetection):
    """Every sample decoded once, up front: the loader then only hands out tensors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache = [CocoDetection.__getitem__(self, i) for i in range(len(self))]

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        image, target = self._cache[index]
        return image, dict(target)


def _step_seconds(cfg, warmup: int) -> float:
    stamps = []
    train(cfg, progress=lambda event: stamps.append(time.perf_counter()) if "max_steps" in event else None)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return statistics.mean(gaps)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the mean (start-up)")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three runs, taken in turn")
    parser.add_argument("--runs", default="model,workers,inline",
                        help="which of the three runs (a subset prints only their lines; ratios need model)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")

    with tempfile.TemporaryDirectory() as tmp:
        data = make_shapes(Path(tmp) / "shapes", n_train=args.images, n_val=0, seed=11,
                           image_size=(min(192, args.max_side), args.max_side))
        base = load_train_config(CONFIG, [
            f"data.train_annotations={data['train_annotations']}", f"data.train_images={data['train_images']}",
            "data.val_annotations=null", "data.val_images=null", "data.hflip_prob=0.0",
            f"data.max_side={args.max_side}", f"optim.max_steps={args.steps}", f"optim.batch_size={args.batch_size}",
            "model.device=cpu", "train.eval_every=0", f"train.ckpt_every={args.steps}", f"train.log_every={args.steps}",
        ], out_dir=Path(tmp) / "runs")
        first = stage_config(base, 0)

        def run(name: str, workers: int, in_memory: bool = False) -> float:
            cfg = stage_config(base, 0)
            cfg.train.num_workers, cfg.out_dir = workers, str(Path(tmp) / "runs" / name)
            with mock.patch("regionclip.train.loop.CocoDetection", InMemory if in_memory else CocoDetection):
                return _step_seconds(cfg, args.warmup)

        runs = {"model": lambda: run("model", 0, in_memory=True), "workers": lambda: run("workers", args.workers),
                "inline": lambda: run("inline", 0)}
        wanted = [k for k in runs if k in args.runs.split(",")]
        times: dict[str, list[float]] = {k: [] for k in wanted}
        for _ in range(args.repeats):
            for k in wanted:
                times[k].append(runs[k]())
        median = {k: statistics.median(v) for k, v in times.items()}
        model_only, overlapped, inline = (median.get(k, float("nan")) for k in ("model", "workers", "inline"))

    result = {
        "device": "cpu", "torch_threads": torch.get_num_threads(), "stage": first.out_dir.rsplit("/", 1)[-1],
        "batch_size": args.batch_size, "max_side": args.max_side, "steps_timed": args.steps - 1 - args.warmup,
        "repeats": args.repeats, "runs_s_per_step": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "model_only_s_per_step": round(model_only, 4),
        f"workers_{args.workers}_s_per_step": round(overlapped, 4),
        "workers_0_s_per_step": round(inline, 4),
        f"ratio_workers_{args.workers}": round(overlapped / model_only, 3),
        "ratio_workers_0": round(inline / model_only, 3),
    }
    print(f"{'loading':<16}{'s/step':>8}{'x model only':>14}")
    for name, seconds in (("model only", model_only), (f"workers {args.workers}", overlapped), ("workers 0", inline)):
        if seconds == seconds:  # a run left out is NaN
            print(f"{name:<16}{seconds:>8.3f}{seconds / model_only:>14.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
