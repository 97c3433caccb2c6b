"""The label job: sources -> shards -> ``Predictor.stream`` -> one Parquet file per shard.

``label_images`` is one process's share of a run (all of it alone; its shards under torchrun or
``--shard i/N``). Everything that can fail cheaply is checked before ``build()`` loads the model:
the output folder is writable, the sources expand to images, an existing manifest matches. Then
the shards this process owns and that are not complete on disk stream through the predictor as
one list (decoding runs ahead across shard boundaries) and each shard is written as soon as its
last image is done. A killed run loses at most the shards it was writing; the same command
continues it. Images that fail to decode become rows with their reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..atomic import atomic_path
from ..errors import BadImage, BadInput
from ..outputs import check_output_dir
from . import store
from .shards import Shard, assigned, check_layout, layout, plan
from .items import FILE as ITEMS
from .items import ItemList, ShardItems, write_items
from .sources import iter_sources

# Config entries that do not change what a run computes: a run may continue on another device.
_NOT_IDENTITY = ("device", "name")


def model_identity(cfg, spec: str) -> dict:
    """What ``manifest.json`` records of the model: the ``--model`` spec, a hash of its resolved
    config (device aside) and the SHA-256 of each weights file it loads (``checkpoint``, local
    ``clip_pretrained`` / ``detector_weights`` paths). ``cfg`` is a ``ModelConfig``."""
    from ..config import to_dict

    data = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IDENTITY}
    data.get("text", {}).pop("cache_dir", None)
    files = {}
    for key in ("checkpoint", "clip_pretrained", "detector_weights"):
        value = data.get(key)
        if value and Path(str(value)).expanduser().is_file():
            files[key] = store.file_sha256(Path(str(value)).expanduser())
            data[key] = Path(str(value)).name  # the file's content identifies it, not where it lies
    random = not files and data.get("clip_pretrained") == "none"
    config_hash = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    return {"spec": spec, "config_sha256": config_hash, "files": files, "random_weights": random}


@dataclass
class LabelSummary:
    """One process's run: ``images`` and ``shards`` of the whole run; ``assigned`` shards this
    process owns, ``skipped`` of them already complete; ``done`` images labelled now, ``failed``
    of them undecodable (``failures``: (image, reason), the first 50; ``failed_before``: those in
    the shards an earlier call finished); ``detections`` written;
    ``problems``: specs that matched nothing; ``interrupted``: stopped by Ctrl-C."""

    out: Path
    images: int = 0
    shards: int = 0
    assigned: int = 0
    skipped: int = 0
    written: int = 0
    done: int = 0
    failed: int = 0
    detections: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    interrupted: bool = False
    todo: int = 0  # images this process labels in this call
    failed_before: int = 0  # undecodable images in the shards finished by an earlier call


@dataclass
class Job:
    """A checked run, ready to label: its folder, items (on disk), and this process's shards still to write."""

    out: Path
    items: ItemList
    todo: list[Shard]
    vocabulary: list[str] | Vocabulary  # what Predictor.stream takes: the names, or the --vocab classes
    summary: LabelSummary


def prepare(sources: Sequence[str | os.PathLike], labels: Sequence[str] | Vocabulary, out: str | os.PathLike, *, identity: dict,
            shard_size: int = 1000, part: tuple[int, int] = (0, 1), rank: int = 0, world: int = 1,
            overwrite: bool = False, embeddings: bool = False) -> Job:
    """Every check that needs no model, then the manifest and this process's unfinished shards
    (see ``label_images``; the Ray engine starts from here too)."""
    store.require_pyarrow()
    out = check_output_dir(out, "--out")
    from ..vocabulary import Vocabulary

    spec = labels if isinstance(labels, Vocabulary) else None  # --vocab / --exemplar
    vocab = spec.names if spec is not None else [str(s) for s in labels]
    if not vocab:
        raise BadInput('no labels given: pass --labels "dog,cat" or --labels-file vocab.txt (one per line)')
    plan(0, shard_size)  # checks the size before the sources are read
    problems: list[str] = []
    with atomic_path(out / ITEMS) as tmp:  # renamed into place only once the checks below pass
        items = write_items(tmp, iter_sources(sources, problems), shard_size, out / ITEMS)
        if not items.count:
            raise BadImage("no images to label: " + "; ".join(problems))
        shards = plan(items.count, shard_size)
        split = layout(shard_size, part, world)
        manifest = {**identity, "layout": split, "vocabulary": vocab,
                    "vocabulary_spec": spec.to_manifest() if spec is not None else None, "embeddings": bool(embeddings),
                    "shard_size": int(shard_size), "images": items.count, "shards": len(shards),
                    "sources_sha256": items.sha256, "sources": [str(s) for s in sources]}
        old = store.read_manifest(out) if not overwrite else None
        if old is not None and (key := store.mismatch(old, manifest)) is not None:
            raise BadInput(f"{out / store.MANIFEST} belongs to another run (its {key} differs from this command's): "
                           "pass --overwrite to label again from the start, or choose another --out")
        if old is not None:
            check_layout(old.get("layout"), split, str(out / store.MANIFEST))
    from .. import __version__

    mine = assigned(shards, part, rank, world)
    summary = LabelSummary(out=out, images=items.count, shards=len(shards), assigned=len(mine), problems=problems)
    if overwrite:
        _clear(out, mine, len(shards) if (part[0], rank) == (0, 0) else None)
    store.write_manifest(out, {**manifest, "regionclip": __version__})
    todo = []
    for s in mine:
        failed = None if overwrite else store.finished_shard(out, s, items.keys(s))
        if failed is None:
            todo.append(s)
        else:
            summary.failed_before += failed
    summary.skipped = len(mine) - len(todo)
    summary.todo = sum(s.size for s in todo)
    for s in todo:  # what a killed write left (atomic_path cleans up after anything but SIGKILL)
        for tmp in out.glob(f".{s.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
        store.clear_parts(out, s)
    return Job(out, items, todo, spec if spec is not None else vocab, summary)


def label_images(
    sources: Sequence[str | os.PathLike],
    labels: Sequence[str] | Vocabulary,
    build: Callable[[], object],
    out: str | os.PathLike,
    *,
    identity: dict,
    shard_size: int = 1000,
    part: tuple[int, int] = (0, 1),
    rank: int = 0,
    world: int = 1,
    overwrite: bool = False,
    embeddings: bool = False,
    batch_size: int = 8,
    num_workers: int = 2,
    scoring: dict | None = None,
    tiling: dict | None = None,
    before_run: Callable[[LabelSummary], None] | None = None,
    on_result: Callable[[object], None] | None = None,
) -> LabelSummary:
    """Label this process's shards of ``sources`` with ``labels``; write them under ``out``.

    ``build()`` returns the predictor (``RegionCLIP`` or ``Predictor``), called only when a
    shard needs work. ``identity``: ``{"model": model_identity(...), "scoring": the resolved
    scoring config}``, what the manifest must match on a second run. ``part`` (``--shard i/N``),
    ``rank``/``world`` (torchrun) pick the shards (``shards.assigned``). ``overwrite``: start
    again whatever the folder holds. ``embeddings``: store each box's region embedding (fp16;
    the crop tower runs once more over the kept boxes). ``before_run(summary)`` runs after the
    checks, before the model is built; ``on_result(prediction)`` after each image. ``tiling``:
    ``{"tile", "tile_overlap"}`` for ``Predictor.stream`` (record it in ``identity``: it changes
    the boxes); not with ``embeddings``.

    Raises ``BadOutput`` (folder not writable), ``BadImage`` (no images), ``BadInput`` (a source
    that does not exist; the manifest is another run's or was split with another ``part``/``world``
    layout, without ``overwrite``), ``MissingDependency`` (no pyarrow).
    """
    if tiling and embeddings:
        raise BadInput("--embeddings embeds each box in the whole image reduced to the model's input, which "
                       "loses the small objects --tile finds: leave out one of them")
    job = prepare(sources, labels, out, identity=identity, shard_size=shard_size, part=part, rank=rank,
                  world=world, overwrite=overwrite, embeddings=embeddings)
    summary = job.summary
    if before_run is not None:
        before_run(summary)
    if not job.todo:
        return summary
    net = build()
    start = time.perf_counter()
    try:
        _run(net, job, embeddings, batch_size, num_workers, {**(tiling or {}), **(scoring or {})}, on_result)
    except KeyboardInterrupt:
        summary.interrupted = True  # the shards written so far are complete; the same command continues
    summary.seconds = time.perf_counter() - start
    return summary


def _clear(out: Path, mine: list[Shard], n_shards: int | None) -> None:
    """--overwrite: remove this process's shard files (and, for the first process, any beyond the plan)."""
    for s in mine:
        (out / s.name).unlink(missing_ok=True)
    if n_shards is not None:
        for f in out.glob("shard-*.parquet"):
            index = f.stem.removeprefix("shard-")
            if index.isdigit() and int(index) >= n_shards:
                f.unlink(missing_ok=True)


def _run(net, job: Job, embeddings: bool, batch_size: int, num_workers: int, scoring: dict, on_result) -> None:
    from ..io import LoadedImage

    todo, vocab, out, summary = job.todo, job.vocabulary, job.out, job.summary
    wanted = ShardItems(job.items, todo)  # read from the folder's item list as the decoders go
    workers = num_workers if len(wanted) > batch_size else 0  # one chunk: nothing to decode ahead of
    shard_iter = iter(todo)
    shard, rows = next(shard_iter), []
    for p in net.stream(wanted, vocab, batch_size=batch_size, num_workers=workers, keep_images=embeddings,
                        **scoring):
        rows.append(row_of(net, p, embeddings, LoadedImage, summary))
        if on_result is not None:
            on_result(p)
        if len(rows) == shard.size:
            store.write_shard(out, shard, rows, embeddings)
            summary.written += 1
            shard, rows = next(shard_iter, None), []


def row_of(net, p, embeddings: bool, LoadedImage, summary: LabelSummary) -> dict:
    """A ``Prediction`` as a shard row (``store``'s columns); counts it in ``summary``."""
    summary.done += 1
    if p.error is not None:
        summary.failed += 1
        if len(summary.failures) < 50:
            summary.failures.append((str(p.source), p.error))
        row = {"image": str(p.source), "width": None, "height": None, "boxes_xyxy": [], "labels": [],
               "label_ids": [], "scores": [], "error": p.error, "margins": None, "threshold_gaps": None,
               "near_miss": None, "priority": None}
        return {**row, "embeddings": [] if embeddings else None}
    d = p.detections.cpu()
    h, w = p.original_size
    summary.detections += len(d)
    row = {"image": str(p.source), "width": int(w), "height": int(h),
           "boxes_xyxy": d.boxes_xyxy.float().numpy().astype(np.float32), "labels": list(d.names),
           "label_ids": d.label_ids.numpy().astype(np.int32), "scores": d.scores.float().numpy().astype(np.float32),
           "error": None, **doubt_columns(d)}
    if embeddings:
        emb = net.encode_regions(LoadedImage(p.image, p.original_size), d.boxes_xyxy) if len(d) else None
        row["embeddings"] = [] if emb is None else emb.float().cpu().numpy().astype(np.float16)
    return row


def doubt_columns(d) -> dict:
    """The doubt columns of ``d`` (CPU ``Detections``): its figures and the image's priority, or
    nulls where the backend gave none (the ONNX runtime)."""
    from ..doubt import detections_priority

    if d.doubt is None:
        return {"margins": None, "threshold_gaps": None, "near_miss": None, "priority": None}
    return {"margins": d.doubt.margins.float().numpy().astype(np.float32),
            "threshold_gaps": d.doubt.threshold_gaps.float().numpy().astype(np.float32),
            "near_miss": float(d.doubt.near_miss), "priority": detections_priority(d)}


def scoring_identity(cfg, overrides: dict) -> dict:
    """The scoring config a run uses (the model's with the flags), for the manifest."""
    from ..config import to_dict

    return to_dict(dataclasses.replace(cfg.scoring, **overrides))


def gather_counts(summary: LabelSummary, world: int) -> dict[str, int]:
    """The run's counts summed over the torchrun ranks (gloo, or NCCL on GPUs); this process's alone."""
    names = ("done", "failed", "detections", "written", "skipped", "failed_before")
    counts = {n: int(getattr(summary, n)) for n in names}
    if world <= 1:
        return counts
    import torch
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        from datetime import timedelta

        # The ranks meet only here, at the end: one may finish hours after another.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    t = torch.tensor([counts[n] for n in names], dtype=torch.long)
    dist.all_reduce(t)
    if own:
        dist.destroy_process_group()
    return dict(zip(names, t.tolist()))
