"""CPU latency of an ONNX export under onnxruntime next to the same model in torch, in one run.

For each model (the shipped demo, then presets built with random weights, which leaves every
stage's cost as it is with real ones): export to a temporary folder (timed), then on the same
synthetic shapes images ``RegionCLIP.detect`` and ``OnnxDetector.detect`` (labels encoded once
before timing in both; one warm-up call each excluded; the median over ``--iters`` passes of
the images, each image through torch then onnxruntime). Also checks that both found the same
detections. Offline; needs ``pip install -e ".[onnx]"``.

    python benchmarks/bench_onnx.py --threads 2                                   # demo + fast
    python benchmarks/bench_onnx.py --models demo fast vitb16 --images 2 --iters 1  # + the default preset (minutes)

Prints a markdown table headed by the CPU's name; ``ORT / torch`` below 1 means onnxruntime is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from regionclip import RegionCLIP
from regionclip.bench import device_name
from regionclip.data.shapes import CATEGORIES, render_shapes_image
from regionclip.onnx import OnnxDetector, export_onnx


def compare(model: RegionCLIP, net: OnnxDetector, images, labels, iters: int) -> tuple[float, float, bool]:
    """(torch s / image, onnxruntime s / image, same detections): medians over ``iters`` passes of
    ``images``, each image through torch and then onnxruntime, so load from other processes
    falls on both alike; one warm-up call each first."""
    model.detect(images[0], labels), net.detect(images[0], labels)
    t_torch, t_ort, same = [], [], True
    for _ in range(iters):
        for img in images:
            start = time.perf_counter()
            a = model.detect(img, labels)
            t_torch.append(time.perf_counter() - start)
            start = time.perf_counter()
            b = net.detect(img, labels)
            t_ort.append(time.perf_counter() - start)
            same = same and same_detections(a, b)
    return statistics.median(t_torch), statistics.median(t_ort), same


def build(name: str) -> RegionCLIP:
    torch.manual_seed(0)
    if name == "demo":
        return RegionCLIP.from_pretrained("demo", device="cpu")
    return RegionCLIP.from_pretrained(name, device="cpu", clip_pretrained="none", detector_weights="none")


def same_detections(a, b) -> bool:
    if len(a) != len(b):
        return False
    if not len(a):
        return True
    return bool(torch.equal(a.label_ids, b.label_ids) and (a.boxes_xyxy - b.boxes_xyxy).abs().max() < 0.05
                and (a.scores - b.scores).abs().max() < 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo", "fast"],
                        help="demo and/or presets (random weights): fast, vitb16, rn50")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads")
    parser.add_argument("--images", type=int, default=3, help="synthetic shapes images, 480x640")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [render_shapes_image(rng, (480, 640), empty_prob=0.0)[0] for _ in range(args.images)]
    labels = list(CATEGORIES)
    rows = []
    for name in args.models:
        model = build(name)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            export_onnx(model, folder)
            export_s = time.perf_counter() - start
            size_mb = sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20
            net = RegionCLIP.from_onnx(folder, threads=args.threads)  # a Predictor over OnnxDetector
            model.encode_text(labels), net.encode_text(labels)  # both cache their label embeddings
            t_torch, t_ort, same = compare(model, net, images, labels, args.iters)
        rows.append((name, t_torch, t_ort, export_s, size_mb, same))
        print(f"{name}: torch {t_torch * 1000:.0f} ms, onnxruntime {t_ort * 1000:.0f} ms", flush=True)
    import onnxruntime

    print(f"\n{device_name(torch.device('cpu'))}, {args.threads} threads each; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; {args.images} images 480x640, {len(labels)} labels, "
          f"median of {args.iters} passes\n")
    print("| model | torch ms / image | onnxruntime ms / image | ORT / torch | export s | graphs MB "
          "| same detections |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, t_torch, t_ort, export_s, size_mb, same in rows:
        print(f"| {name} | {t_torch * 1000:.0f} | {t_ort * 1000:.0f} | {t_ort / t_torch:.2f} | {export_s:.1f} | "
              f"{size_mb:.0f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
