"""``regionclip label --engine ray``: the same job as a Ray Data pipeline, on one machine or a cluster.

The checks, the manifest, the item list and the choice of unfinished shards are ``run.prepare``'s,
so the two engines read the same sources, write the same shard files and continue each other's
runs. The pipeline streams, in three stages:

1. the unfinished shards, one row each (an index: none of its images);
2. ``_decode_shard``, CPU tasks: a shard's items read from the folder's item list
   (``items.ItemList``, by offset) and decoded (``io.decode``), yielded a batch at a time. Neither
   this module nor that path imports torch, so a decoding worker starts in well under a second:
   on a 2-core machine, torch's import in each of them (seconds apiece, beside the model) had cost
   a 1,000-image run about a tenth of its time (docs/label.md);
3. ``_Labeller`` actors, one per GPU (or per two CPUs): each builds the model and resolves the
   vocabulary once, labels what stage 2 decoded, writes the rows as a part of their shard
   (``store.write_part``) and returns counts only.

The driver sums the counts per shard; when a shard's images are all in, a small task merges its
parts into the shard file (``store.merge_parts``). The driver holds neither rows nor the item
list, and writes nothing but the manifest: its memory does not grow with the run, and the disk
bandwidth is the workers'. Connects to the cluster of ``RAY_ADDRESS`` (or the one ``ray.init``
already opened); else starts a local one (``start_local``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import RegionClipError
from . import store
from .items import ItemList
from .run import LabelSummary, prepare, row_of
from .shards import Shard
from .sources import TarMember

# Images per call of a labelling actor: several of the model's batches, so that each call's part
# file (and its write) is shared by more images; the decoded images of one call sit in memory.
CALL_BATCHES = 4


def _readable(item, cwd: str):
    """``item`` as a worker opens it: relative paths are the driver's (a worker's folder differs)."""
    if isinstance(item, TarMember):
        return dataclasses.replace(item, tar=os.path.join(cwd, item.tar))
    return os.path.join(cwd, item)


def _decode_shard(rows: dict, items: ItemList, max_side: int | None, batch: int, cwd: str, tiling=None):
    """Stage 2 (a Ray task): for each shard row, its images decoded, ``batch`` at a time (with
    ``tiling``, an image larger than a window only opened for its size: its actor decodes it at
    the scale the windows need, so it never travels whole)."""
    from ..io import decode

    for index, start, stop in zip(rows["shard"], rows["start"], rows["stop"]):
        shard = Shard(int(index), int(start), int(stop))
        out: dict[str, list] = {"shard": [], "position": [], "key": [], "image": [], "error": [], "decoder": []}
        for position, item in enumerate(items.iter(shard)):
            loaded, error = decode(_readable(item, cwd), max_side, tiling)
            for name, value in zip(out, (shard.index, position, str(item),
                                         pickle.dumps(loaded, protocol=5) if loaded is not None else b"",
                                         error or "", os.getpid())):
                out[name].append(value)
            if len(out["key"]) == batch:
                yield _arrays(out, ("key", "image", "error"))
                out = {name: [] for name in out}
        if out["key"]:
            yield _arrays(out, ("key", "image", "error"))


def _arrays(columns: dict[str, list], objects: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A batch as Ray Data takes it: int64 columns, and ``objects`` (str, bytes) as object arrays."""
    return {name: np.array(values, dtype=object if name in objects else np.int64) for name, values in columns.items()}


class _Labeller:
    """Stage 3 (a Ray actor): one model and one resolved vocabulary for its whole life; decoded
    images in, their rows written as parts of their shards, counts out (``decoded_here``: images
    that were decoded in this very process, which a pipeline of separate stages never has)."""

    def __init__(self, cfg, vocabulary, scoring: dict, batch_size: int, embeddings: bool, out: str,
                 shards: dict[int, tuple[int, int]], threads: int | None, tiling: dict | None = None) -> None:
        if threads:  # Ray gives an actor the threads of the CPUs it reserved: one, here
            import torch

            torch.set_num_threads(threads)
        from ..detector import RegionCLIP

        self.net = RegionCLIP(config=cfg)
        self.vocabulary = self.net.predictor.resolve(vocabulary)  # exemplars hashed, texts encoded: once
        self.scoring, self.batch_size, self.embeddings = scoring, batch_size, embeddings
        self.out, self.shards, self.tiling = out, shards, tiling or {}

    def __call__(self, batch: dict) -> dict:
        from ..io import LoadedImage
        from ..predictor import Prediction

        loaded = [pickle.loads(b) if not e else None for b, e in zip(batch["image"], batch["error"])]
        good = iter(self.net.stream([x for x in loaded if x is not None], self.vocabulary, batch_size=self.batch_size,
                                    num_workers=0, keep_images=self.embeddings, **self.tiling, **self.scoring))
        by_shard: dict[int, tuple[list, list, LabelSummary, list]] = {}
        for shard, position, key, x, error, decoder in zip(batch["shard"], batch["position"], batch["key"], loaded,
                                                           batch["error"], batch["decoder"]):
            positions, rows, counts, here = by_shard.setdefault(int(shard), ([], [], LabelSummary(out=None), []))
            p = next(good) if x is not None else Prediction(key, int(position), error=error)
            rows.append({**row_of(self.net, p, self.embeddings, LoadedImage, counts), "image": key})
            positions.append(int(position))
            here.append(int(decoder) == os.getpid())
        report: dict[str, list] = {"shard": [], "images": [], "failed": [], "detections": [], "failures": [],
                                   "decoded_here": []}
        for index, (positions, rows, counts, here) in by_shard.items():
            store.write_part(self.out, Shard(index, *self.shards[index]), positions, rows, self.embeddings)
            for name, value in zip(report, (index, counts.done, counts.failed, counts.detections,
                                            json.dumps(counts.failures), sum(here))):
                report[name].append(value)
        return _arrays(report, ("failures",))


def _ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise store.MissingDependency('--engine ray needs Ray: pip install -e ".[ray]" (or pip install "ray[data]")') from None
    return ray


# Ray's settings for a local Ray (``start_local``): what the environment sets (``RAY_<name>``) wins.
LOCAL_SETTINGS = {
    # Workers at the driver's priority, not Ray's nice 15 (which lets its daemons come first). Here
    # the workers do the labelling, and at nice 15 any busy process on the machine starves them:
    # the local test took 10 s alone and 3 minutes beside a 2-thread matmul loop, its actor
    # "pending" while it built the model at a few % of a core.
    "worker_niceness": 0,
    # Idle workers kept for 10 minutes, not Ray's 1 s (past one per CPU): decoding and merging
    # come in bursts, and each burst started fresh worker processes, each importing Ray again
    # (about a CPU-second apiece): 11 of them in a 1,000-image run on 2 cores, 2 with this.
    "idle_worker_killing_time_threshold_ms": 600_000,
}


def start_local(num_cpus: int | None = None) -> None:
    """Start a local Ray tuned for this pipeline on one machine (``LOCAL_SETTINGS``)."""
    ray = _ray()
    config = {k: v for k, v in LOCAL_SETTINGS.items() if f"RAY_{k}" not in os.environ}
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _system_config=config)


def _max_side(cfg) -> int | None:
    """The side images are decoded at (``RegionCLIP.input_max_side``), from a model built on a CPU
    when the config leaves the detector's sizes to its builder."""
    from ..detector import RegionCLIP

    return RegionCLIP(config=dataclasses.replace(cfg, device="cpu", precision="fp32")).input_max_side


def label_with_ray(
    sources: Sequence[str | os.PathLike],
    labels: Sequence[str],
    cfg,
    out: str | os.PathLike,
    *,
    identity: dict,
    actors: int | None = None,
    batch_size: int = 8,
    scoring: dict | None = None,
    tiling: dict | None = None,
    before_run: Callable[[LabelSummary], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    **job,
) -> LabelSummary:
    """Label ``sources`` under Ray Data; arguments as ``run.label_images`` (``job``: ``shard_size``,
    ``part``, ``rank``, ``world``, ``overwrite``, ``embeddings``), but the model comes from its
    ``ModelConfig`` ``cfg``, built once in each actor. ``actors``: how many (default: one per
    GPU of the cluster, else one per two CPUs). ``num_workers`` is ignored: decoding is a stage of
    its own, on the cluster's CPUs. ``on_progress(n)``: ``n`` more images labelled. ``tiling``:
    ``tile`` / ``tile_overlap`` (``Predictor.stream``)."""
    ray = _ray()
    job.pop("num_workers", None)
    embeddings = bool(job.get("embeddings", False))
    plan = prepare(sources, labels, out, identity=identity, **job)
    summary = plan.summary
    if before_run is not None:
        before_run(summary)
    if not plan.todo:
        return summary
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            start_local()
    start = time.perf_counter()
    try:
        _pipeline(ray, plan, cfg, actors, batch_size, scoring or {}, embeddings, summary, on_progress, tiling or {})
    except KeyboardInterrupt:
        summary.interrupted = True  # the shards merged so far are complete; the same command continues
    except Exception as exc:  # a failed actor surfaces as Ray's own error type: say what to do
        if isinstance(exc, RegionClipError):
            raise
        raise RegionClipError(f"the Ray job failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                              "the shards written are complete: fix the cause and run the same command") from None
    summary.seconds = time.perf_counter() - start
    return summary


def _pipeline(ray, plan, cfg, actors, batch_size: int, scoring: dict, embeddings: bool, summary: LabelSummary,
              on_progress, tiling: dict) -> None:
    from ..model import input_max_side
    from ..tiles import check_tiling

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    count = actors or (gpus if gpus else max(1, cpus // 2))
    out = str(plan.out.resolve())
    items = dataclasses.replace(plan.items, path=str(Path(plan.items.path).resolve()))
    try:
        max_side = input_max_side(cfg)
    except LookupError:
        max_side = ray.get(ray.remote(num_cpus=1)(_max_side).remote(cfg))
    shards = {s.index: s for s in plan.todo}
    context = ray.data.DataContext.get_current()
    # Ray Data gathers what a task yields into blocks of up to 128 MiB, so a task's output (a
    # shard's images decoded, an actor's reports) would move on only when the task ends: one
    # block per yield lets each batch move on as it is made.
    saved, context.target_max_block_size = context.target_max_block_size, 1
    try:
        data = ray.data.from_items([{"shard": s.index, "start": s.start, "stop": s.stop} for s in plan.todo],
                                   override_num_blocks=len(plan.todo))  # a task per shard: decoding spreads out
        # Half a CPU per decoding task: decoding a batch is short next to labelling it, so two share
        # a core. The unequal share also keeps the stages apart: Ray Data fuses a task stage into the
        # actor stage after it when their resources agree, and decoding would then run inside the
        # actors, in turn with the model (``decoded_here`` counts what did; the tests check for none).
        data = data.map_batches(_decode_shard, batch_size=1, num_cpus=0.5, batch_format="numpy",
                                fn_kwargs=dict(items=items, max_side=max_side, batch=batch_size, cwd=os.getcwd(),
                                               tiling=check_tiling(tiling.get("tile"), tiling.get("tile_overlap"))))
        data = data.map_batches(
            _Labeller, batch_size=batch_size * CALL_BATCHES, concurrency=count, batch_format="numpy",
            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
            fn_constructor_kwargs=dict(cfg=cfg, vocabulary=plan.vocabulary, scoring=scoring, batch_size=batch_size,
                                       embeddings=embeddings, out=out, threads=None if gpus else max(1, cpus // count),
                                       tiling=tiling,
                                       shards={k: (s.start, s.stop) for k, s in shards.items()}))
        _collect(ray, data, shards, out, embeddings, summary, on_progress)
    finally:
        context.target_max_block_size = saved


def _collect(ray, data, shards: dict[int, Shard], out: str, embeddings: bool, summary: LabelSummary,
             on_progress) -> None:
    """The driver's part: the actors' counts summed per shard, a merge started for each shard
    whose images are all in."""
    merge = ray.remote(num_cpus=0)(store.merge_parts)  # file work: it takes no CPU slot from the stages
    got: dict[int, int] = {}
    merging: list = []
    for report in data.iter_batches(batch_size=None, batch_format="numpy"):
        for index, images, failed, detections, failures in zip(report["shard"], report["images"], report["failed"],
                                                                report["detections"], report["failures"]):
            summary.done, summary.failed = summary.done + int(images), summary.failed + int(failed)
            summary.detections += int(detections)
            summary.failures += [tuple(f) for f in json.loads(failures)][:max(0, 50 - len(summary.failures))]
            if on_progress is not None:
                on_progress(int(images))
            got[int(index)] = got.get(int(index), 0) + int(images)
            if got[int(index)] == shards[int(index)].size:
                merging.append(merge.remote(out, shards[int(index)], embeddings))
                del got[int(index)]
        done, merging = ray.wait(merging, num_returns=len(merging), timeout=0) if merging else ([], merging)
        summary.written += len(ray.get(done))
    summary.written += len(ray.get(merging))
