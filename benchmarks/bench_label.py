"""Does ``regionclip label`` stream? Peak memory against the number of images, and images/s
against the bare model loop at the same batch size.

    python benchmarks/bench_label.py [--memory 200,2000] [--images 1000] [--batch-size 8]
                                     [--workers 2] [--set proposals.num_proposals=20] [--json F]

Generates shapes JPEGs (256x256, seeded) in a temporary folder, then, with the demo model on
the CPU:

- **memory**: for each count of ``--memory``, a fresh process runs ``regionclip label`` over
  that many images and reports its peak RSS (``VmHWM``: the main process; the decoding
  workers' largest ``ru_maxrss`` separately). Target (issue 22): the largest count within 10% of the smallest.
- **throughput**: in one process, the bare model loop (``backend.detect_chunk`` over chunks of
  ``--batch-size`` images decoded before the clock starts) against ``label`` over the same
  ``--images`` files (decoding in ``--workers`` processes, writing Parquet shards), each after
  a warm-up chunk. Target: label >= 0.9x the bare loop's images/s.

``--set`` overrides the model config for both parts (e.g. fewer proposals, to run the memory
part in minutes instead of tens of minutes on 2 cores); the printed report says what was set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def make_images(folder: Path, n: int, size: int = 256) -> list[str]:
    """``n`` JPEGs of a few filled shapes on noise, the same for a seed, made once per folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:05d}.jpg"
        if not p.exists():
            rng = np.random.default_rng(i)
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            for _ in range(3):
                x, y, r = (int(v) for v in rng.integers(20, size - 20, 3) % (size // 2) + 10)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                if rng.random() < 0.5:
                    cv2.circle(img, (x, y), r // 2, colour, -1)
                else:
                    cv2.rectangle(img, (x, y), (x + r, y + r), colour, -1)
            cv2.imwrite(str(p), img)
        paths.append(str(p))
    return paths


def _label_argv(listing: Path, out: Path, args) -> list[str]:
    argv = ["label", str(listing), "--model", "demo", "--device", "cpu", "--out", str(out), "--batch-size",
            str(args.batch_size), "--workers", str(args.workers), "--shard-size", str(args.shard_size)]
    for s in args.set or []:
        argv += ["--set", s]
    return argv


def child_memory(listing: str, out: str, argv_json: str) -> None:
    """In a fresh process: run label, print peak RSS (MiB) of this process and of its largest child."""
    from regionclip_cli.main import main

    try:
        main(json.loads(argv_json))
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    # VmHWM: this process's own peak (ru_maxrss would include the parent's, carried across exec).
    self_mb = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # a forked worker's, shared pages too
    print(json.dumps({"peak_rss_mib": round(self_mb, 1), "largest_worker_rss_mib": round(child_mb, 1)}))


def memory(paths: list[str], counts: list[int], root: Path, args) -> dict:
    found = {}
    for n in counts:
        listing = root / f"list{n}.txt"
        listing.write_text("\n".join(paths[:n]) + "\n")
        argv = _label_argv(listing, root / f"mem{n}", args) + ["--overwrite"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child-memory", str(listing), str(root / f"mem{n}"),
                               json.dumps(argv)], capture_output=True, text=True, check=True)
        found[n] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": round(time.perf_counter() - start, 1)}
        print(f"memory: {n} images: {found[n]}", flush=True)
    lo, hi = found[min(counts)]["peak_rss_mib"], found[max(counts)]["peak_rss_mib"]
    return {"runs": found, "ratio_largest_to_smallest": round(hi / lo, 3)}


def throughput(paths: list[str], root: Path, args) -> dict:
    import torch

    from regionclip import RegionCLIP
    from regionclip.io import load_reduced
    from regionclip.label import label_images, model_identity
    from regionclip.label.run import scoring_identity

    net = RegionCLIP.from_pretrained("demo", list(args.set or []), device="cpu")
    labels = list(net.cfg.labels)
    be, cfg = net.predictor.backend, net.scoring_config()
    lab, emb = net.vocabulary(labels)
    size = args.batch_size
    loaded = [load_reduced(p, net.input_max_side) for p in paths]
    with torch.inference_mode():
        be.detect_chunk(loaded[:size], lab, emb, cfg, None, False, size)  # warm-up
        start = time.perf_counter()
        for i in range(0, len(loaded), size):
            be.detect_chunk(loaded[i:i + size], lab, emb, cfg, None, False, size)
        bare = len(loaded) / (time.perf_counter() - start)
    del loaded
    listing = root / "throughput.txt"
    listing.write_text("\n".join(paths) + "\n")
    identity = {"model": model_identity(net.cfg, "demo"), "scoring": scoring_identity(net.cfg, {})}
    common = dict(identity=identity, shard_size=args.shard_size, batch_size=size, num_workers=args.workers,
                  overwrite=True)
    warm = root / "warm.txt"
    warm.write_text("\n".join(paths[:size]) + "\n")
    label_images([str(warm)], labels, lambda: net, root / "warm", **common)
    start = time.perf_counter()
    summary = label_images([str(listing)], labels, lambda: net, root / "throughput", **common)
    label = summary.done / (time.perf_counter() - start)
    return {"images": len(paths), "batch_size": size, "workers": args.workers, "bare_img_s": round(bare, 2),
            "label_img_s": round(label, 2), "ratio": round(label / bare, 3), "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="200,2000", help="image counts for the memory part ('' skips it)")
    parser.add_argument("--images", type=int, default=1000, help="images for the throughput part (0 skips it)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--set", action="append", help="model config override, as regionclip --set")
    parser.add_argument("--folder", help="where the generated images live (default: a temporary folder)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--child-memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        child_memory(*args.child_memory)
        return {}
    counts = [int(c) for c in args.memory.split(",") if c.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        root = Path(tmp)
        folder = Path(args.folder) if args.folder else root / "images"
        paths = make_images(folder, max(counts + [args.images]))
        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                  "load_average": os.getloadavg(), "set": args.set or []}
        if counts:
            report["memory"] = memory(paths, counts, root, args)
        if args.images:
            report["throughput"] = throughput(paths[:args.images], root, args)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
