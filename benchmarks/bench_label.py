"""How fast does ``regionclip label`` go, engine by engine, and does the Ray driver's memory stay flat?

    python benchmarks/bench_label.py [--images 1000] [--repeats 3] [--memory 200,2000] [--batch-size 8]
                                     [--workers 2] [--shard-size 100] [--side 128,192]
                                     [--set proposals.num_proposals=20] [--presets fast,rn50] [--json F]

Generates shapes images once (``regionclip make-shapes``'s generator, sides ``--side``), then:

- **throughput**, in this process, on the same ``--images`` files, the model's own 12 names:
  the bare model loop (``backend.detect_chunk`` over chunks of ``--batch-size`` images decoded
  before the clock starts), the plain engine (``label_images``: decoding in ``--workers``
  processes, Parquet shards written) and the Ray engine (``label_with_ray`` on a local Ray
  started before the clock: decoding tasks, labelling actors, parts merged into shards). Each
  engine's clock runs from the call to its return, model build included (the plain engine builds
  it in ``build()``, the Ray actors their own, in new processes); for Ray also the rate after its
  first report, once the actors run. The two engines take turns ``--repeats`` times (plain, Ray,
  plain, Ray, ...), as the load of a shared machine drifts by 15% and more within minutes; the
  report gives each turn's ratio and their median. Ray's first turn also starts Ray Data's own
  actors on the fresh local Ray (later turns find them running, as on a cluster after its first
  job). Target (issue 32): Ray >= 0.9x plain.
- **memory**: for each count of ``--memory``, a fresh process runs ``regionclip label --engine
  ray`` over that many images and reports its peak RSS (``VmHWM``): the driver's, since the model
  lives in the actors. Target: the largest count within 10% of the smallest.
- **GPU** (only where CUDA is visible): for each of ``--presets`` at bf16, img/s on one GPU of the
  bare loop and of the plain engine; with 2+ GPUs, the Ray engine with one actor and with one per
  GPU. Targets: label >= 0.9x the bare loop; 2 GPUs >= 1.8x one. Without CUDA the report says
  ``"not measured"`` and why.

``--set`` overrides the demo model's config for the CPU parts (fewer proposals keep the run in
minutes on 2 cores); the report says what was set, the date, the CPUs and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, n: int, sides: tuple[int, int]) -> list[str]:
    """``n`` shapes JPEGs (seed 0), made once per folder."""
    from regionclip.data.shapes import make_shapes

    val = folder / "val"
    if not val.is_dir() or len(list(val.glob("*.jpg"))) < n:
        make_shapes(folder, n_train=0, n_val=n, image_size=sides, captions_per_image=0, overwrite=True)
    return sorted(str(p) for p in val.glob("*.jpg"))[:n]


def _peak_rss_mib() -> float:
    # VmHWM: this process's own peak (ru_maxrss would include the parent's, carried across exec)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024


def child_memory(argv_json: str) -> None:
    """In a fresh process: run ``regionclip label`` with these arguments, print its peak RSS."""
    from regionclip_cli.main import main

    try:
        main(json.loads(argv_json))
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    print(json.dumps({"peak_rss_mib": round(_peak_rss_mib(), 1)}))


def memory(paths: list[str], counts: list[int], root: Path, args) -> dict:
    found = {}
    for n in counts:
        listing = root / f"list{n}.txt"
        listing.write_text("\n".join(paths[:n]) + "\n")
        argv = ["label", str(listing), "--model", "demo", "--device", "cpu", "--out", str(root / f"mem{n}"),
                "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--engine", "ray",
                "--overwrite", "--allow-failures"] + [x for s in args.set or [] for x in ("--set", s)]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child-memory", json.dumps(argv)], capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"the memory run of {n} images failed:\n{proc.stderr[-3000:]}")
        found[n] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                    "seconds": round(time.perf_counter() - start, 1), "load_average": os.getloadavg()}
        print(f"memory (ray driver): {n} images: {found[n]}", flush=True)
    lo, hi = found[min(counts)]["peak_rss_mib"], found[max(counts)]["peak_rss_mib"]
    return {"engine": "ray", "runs": found, "ratio_largest_to_smallest": round(hi / lo, 3)}


def bare_loop(net, paths: list[str], size: int) -> float:
    """Images/s of ``detect_chunk`` alone over images decoded before the clock starts."""
    import torch

    from regionclip.io import load_reduced
    from regionclip.runtime import synchronize

    be, cfg = net.predictor.backend, net.scoring_config()
    lab, emb = net.vocabulary(list(net.cfg.labels))
    loaded = [load_reduced(p, net.input_max_side) for p in paths]
    with torch.inference_mode():
        be.detect_chunk(loaded[:size], lab, emb, cfg, None, False, size)  # warm-up
        synchronize(net.device)
        start = time.perf_counter()
        for i in range(0, len(loaded), size):
            be.detect_chunk(loaded[i:i + size], lab, emb, cfg, None, False, size)
        synchronize(net.device)
        return len(loaded) / (time.perf_counter() - start)


def _common(cfg, spec: str, args, listing: Path) -> dict:
    from regionclip.label import model_identity
    from regionclip.label.run import scoring_identity

    identity = {"model": model_identity(cfg, spec), "scoring": scoring_identity(cfg, {})}
    return dict(sources=[str(listing)], labels=list(cfg.labels), identity=identity, shard_size=args.shard_size,
                batch_size=args.batch_size, overwrite=True)


def plain_engine(cfg, spec: str, listing: Path, out: Path, args) -> float:
    from regionclip import RegionCLIP
    from regionclip.label import label_images

    start = time.perf_counter()
    summary = label_images(build=lambda: RegionCLIP(config=cfg), out=out, num_workers=args.workers,
                           **_common(cfg, spec, args, listing))
    return summary.done / (time.perf_counter() - start)


def ray_engine(cfg, spec: str, listing: Path, out: Path, args, actors: int | None = None) -> tuple[float, float]:
    """(img/s from the call to its return, img/s after the first actor's first report: what the
    pipeline does once its actors have started and built their models)."""
    from regionclip.label.ray_engine import label_with_ray

    first: list[tuple[float, int]] = []

    def seen(n: int) -> None:
        if not first:
            first.append((time.perf_counter(), n))

    start = time.perf_counter()
    summary = label_with_ray(cfg=cfg, out=out, actors=actors, on_progress=seen, **_common(cfg, spec, args, listing))
    end = time.perf_counter()
    return summary.done / (end - start), (summary.done - first[0][1]) / (end - first[0][0])


def throughput(paths: list[str], root: Path, args) -> dict:
    import ray
    import torch

    from regionclip import RegionCLIP
    from regionclip.label.ray_engine import start_local
    from regionclip.model import resolve_model_config

    cfg = resolve_model_config("demo", list(args.set or []))
    cfg.device = "cpu"
    listing = root / "throughput.txt"
    listing.write_text("\n".join(paths) + "\n")
    found = {"images": len(paths), "batch_size": args.batch_size, "workers": args.workers,
             "torch_threads": torch.get_num_threads()}
    start_local()
    turns = []
    try:
        found["load_average_before"] = os.getloadavg()
        for turn in range(1, args.repeats + 1):
            plain = plain_engine(cfg, "demo", listing, root / "plain", args)
            whole, started = ray_engine(cfg, "demo", listing, root / "ray", args)
            turns.append({"plain_img_s": round(plain, 2), "ray_img_s": round(whole, 2),
                          "ray_after_first_report_img_s": round(started, 2), "ray_to_plain": round(whole / plain, 3),
                          "load_average": os.getloadavg()})
            print(f"turn {turn}: plain engine {plain:.2f} img/s, ray engine {whole:.2f} img/s ({started:.2f} after "
                  f"its first report): {whole / plain:.3f}x", flush=True)
    finally:
        ray.shutdown()
    found["turns"] = turns
    found["bare_img_s"] = round(bare_loop(RegionCLIP(config=cfg), paths, args.batch_size), 2)
    print(f"bare model loop: {found['bare_img_s']} img/s", flush=True)
    found["load_average_after"] = os.getloadavg()
    for name in ("plain_img_s", "ray_img_s", "ray_after_first_report_img_s", "ray_to_plain"):
        found[f"median_{name}"] = round(statistics.median(t[name] for t in turns), 3)
    found["plain_to_bare"] = round(found["median_plain_img_s"] / found["bare_img_s"], 3)
    return found


def gpu(paths: list[str], root: Path, args) -> dict:
    """Per-GPU figures at bf16 for each preset; with 2+ GPUs, the Ray engine on 1 and on all."""
    import torch

    if not torch.cuda.is_available():
        return {"not measured": "no CUDA device visible"}
    from regionclip import RegionCLIP
    from regionclip.errors import RegionClipError
    from regionclip.model import resolve_model_config

    listing = root / "gpu.txt"
    listing.write_text("\n".join(paths) + "\n")
    found = {"gpus": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        try:
            cfg = resolve_model_config(preset, [])
            cfg.device, cfg.precision = "cuda:0", "bf16"
            row = {"bare_img_s": round(bare_loop(RegionCLIP(config=cfg), paths, args.batch_size), 2)}
            row["plain_img_s"] = round(plain_engine(cfg, preset, listing, root / f"gpu-{preset}", args), 2)
            row["plain_to_bare"] = round(row["plain_img_s"] / row["bare_img_s"], 3)
            if found["gpus"] >= 2:
                import ray

                from regionclip.label.ray_engine import start_local

                cfg.device = "cuda"
                start_local()
                try:
                    one = ray_engine(cfg, preset, listing, root / f"ray1-{preset}", args, actors=1)[0]
                    every = ray_engine(cfg, preset, listing, root / f"rayN-{preset}", args)[0]
                finally:
                    ray.shutdown()
                row.update(ray_1_gpu_img_s=round(one, 2), ray_all_gpus_img_s=round(every, 2),
                           scaling=round(every / one, 3))
        except RegionClipError as exc:  # weights not in the cache offline, ...
            row = {"not measured": str(exc)}
        found[preset] = row
        print(f"GPU {preset}: {row}", flush=True)
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images for the throughput parts (0 skips them)")
    parser.add_argument("--repeats", type=int, default=3, help="turns of the two engines in the throughput part")
    parser.add_argument("--memory", default="200,2000", help="image counts for the memory part ('' skips it)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="the plain engine's decoding processes")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--side", default="128,192", help="smallest,largest side of the generated images")
    parser.add_argument("--set", action="append", help="demo model config override for the CPU parts, as --set")
    parser.add_argument("--presets", default="fast,rn50", help="models of the GPU part")
    parser.add_argument("--folder", help="where the generated images live (default: a temporary folder)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        child_memory(args.child_memory)
        return {}
    counts = [int(c) for c in args.memory.split(",") if c.strip()]
    sides = tuple(int(s) for s in args.side.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        root = Path(tmp)
        paths = make_images(Path(args.folder) if args.folder else root / "images", max(counts + [args.images]), sides)
        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                  "load_average": os.getloadavg(), "set": args.set or [], "sides": sides,
                  "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
        if args.images:
            report["throughput"] = throughput(paths[:args.images], root, args)
        if counts:
            report["memory"] = memory(paths, counts, root, args)
        if args.images:
            report["gpu"] = gpu(paths[:args.images], root, args)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
