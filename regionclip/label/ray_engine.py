"""``regionclip label --engine ray``: the same job under Ray Data, on one machine or a cluster.

The checks, the manifest and the choice of unfinished shards are ``run.prepare``'s, so the two
engines read the same sources, write the same shard files and continue each other's runs. The
images of the unfinished shards become a Ray dataset; ``map_batches`` runs ``_Labeller``, an
actor per GPU (or per two CPUs) that builds the model once and streams each batch through the
same ``Predictor.stream`` and ``run.row_of``. The driver gathers rows by shard and writes each
shard the moment its last image arrives, as the plain engine does. Connects to the cluster of
``RAY_ADDRESS`` (or the one ``ray.init`` already opened); else starts a local one (``start_local``).
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Callable, Sequence

import numpy as np

from ..errors import RegionClipError
from . import store
from .run import LabelSummary, prepare, row_of


class _Labeller:
    """A Ray actor: one model, batches of pickled items in, pickled shard rows out."""

    def __init__(self, cfg, vocabulary: list[str], scoring: dict, batch_size: int, embeddings: bool,
                 tiling: dict | None = None) -> None:
        from ..detector import RegionCLIP

        self.net = RegionCLIP(config=cfg)
        self.vocabulary, self.scoring, self.batch_size, self.embeddings = vocabulary, scoring, batch_size, embeddings
        self.tiling = tiling or {}

    def __call__(self, batch: dict) -> dict:
        from ..io import LoadedImage

        items = [pickle.loads(b) for b in batch["item"]]
        rows = []
        for p in self.net.stream(items, self.vocabulary, batch_size=self.batch_size, num_workers=0,
                                 keep_images=self.embeddings, **self.tiling, **self.scoring):
            rows.append(pickle.dumps(row_of(self.net, p, self.embeddings, LoadedImage, LabelSummary(out=None))))
        return {"shard": batch["shard"], "position": batch["position"], "row": np.array(rows, dtype=object)}


def _ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise store.MissingDependency('--engine ray needs Ray: pip install -e ".[ray]" (or pip install "ray[data]")') from None
    return ray


def start_local(num_cpus: int | None = None) -> None:
    """Start a local Ray whose workers run at the driver's priority, not Ray's default of nice 15
    (which lets its daemons come first). Here the workers do the labelling, and at nice 15 any busy
    process on the machine starves them: the local test took 10 s alone and 3 minutes beside a
    2-thread matmul loop, its actor "pending" while it built the model at a few % of a core.
    ``RAY_worker_niceness`` in the environment still wins."""
    ray = _ray()
    config = {} if "RAY_worker_niceness" in os.environ else {"worker_niceness": 0}
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _system_config=config)


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
    on_result: Callable[[dict], None] | None = None,
    **job,
) -> LabelSummary:
    """Label ``sources`` under Ray Data; arguments as ``run.label_images`` (``job``: ``shard_size``,
    ``part``, ``rank``, ``world``, ``overwrite``, ``embeddings``), but the model comes from its
    ``ModelConfig`` ``cfg``, built once in each actor. ``actors``: how many (default: one per
    GPU of the cluster, else one per two CPUs). ``num_workers`` is ignored: Ray decodes ahead."""
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
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = actors or (gpus if gpus else max(1, int(resources.get("CPU", 1)) // 2))
    rows = [{"shard": s.index, "position": i - s.start, "item": pickle.dumps(plan.items[i])}
            for s in plan.todo for i in range(s.start, s.stop)]
    data = ray.data.from_items(rows).map_batches(
        _Labeller, fn_constructor_kwargs=dict(cfg=cfg, vocabulary=plan.vocabulary, scoring=scoring or {},
                                              batch_size=batch_size, embeddings=embeddings, tiling=tiling),
        batch_size=batch_size, concurrency=count, num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        batch_format="numpy")
    shards = {s.index: s for s in plan.todo}
    pending: dict[int, dict[int, dict]] = {}
    start = time.perf_counter()
    try:
        for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
            for index, position, blob in zip(batch["shard"], batch["position"], batch["row"]):
                row = pickle.loads(blob)
                _count(summary, row)
                if on_result is not None:
                    on_result(row)
                got = pending.setdefault(int(index), {})
                got[int(position)] = row
                shard = shards[int(index)]
                if len(got) == shard.size:
                    store.write_shard(plan.out, shard, [got[k] for k in range(shard.size)], embeddings)
                    summary.written += 1
                    del pending[int(index)]
    except KeyboardInterrupt:
        summary.interrupted = True
    except Exception as exc:  # a failed actor surfaces as Ray's own error type: say what to do
        if isinstance(exc, RegionClipError):
            raise
        raise RegionClipError(f"the Ray job failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                              "the shards written are complete: fix the cause and run the same command") from None
    summary.seconds = time.perf_counter() - start
    return summary


def _count(summary: LabelSummary, row: dict) -> None:
    summary.done += 1
    if row["error"] is not None:
        summary.failed += 1
        if len(summary.failures) < 50:
            summary.failures.append((row["image"], row["error"]))
    else:
        summary.detections += len(row["labels"])
