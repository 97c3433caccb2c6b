"""A label run's folder: one Parquet file per shard and ``manifest.json``; read back as ``Results``.

Shard columns (one row per image, in the run's order): ``image`` (path, or ``TAR::member``),
``width``/``height`` (original pixels; null when undecodable), ``boxes_xyxy`` (list of 4
float32, original pixels), ``labels`` (names), ``label_ids`` (0-based positions in the
manifest's vocabulary), ``scores`` (float32), ``error`` (why the image has no detections, else
null), how sure the run was (``regionclip.doubt``): ``margins`` and ``threshold_gaps`` (float32
per box), ``near_miss`` and ``priority`` (float32 per image; all null where the backend gave no
figures or the image is undecodable), and, with ``--embeddings``, ``embeddings`` (list of D
float16, unit norm, one per box). Folders written before the doubt columns read the same, with
those left out (``records.from_label_dir``).

Every file is written to a temporary name and renamed (``regionclip.atomic``): a shard file that
exists is complete, unless someone cut it by hand, which ``finished_shard`` notices.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_path
from ..errors import BadInput, RegionClipError
from ..outputs import atomic_write_json
from .shards import Shard

MANIFEST = "manifest.json"
FORMAT = "regionclip-label/1"
# Manifest entries that must match for a second run to continue the first (regionclip's version
# may differ: a bug-fix release resuming a run is fine).
MUST_MATCH = ("model", "vocabulary", "vocabulary_spec", "scoring", "embeddings", "shard_size", "images", "sources_sha256")


class MissingDependency(RegionClipError):
    """An optional package a command needs is not installed."""

    exit_code = 2


def require_pyarrow() -> None:
    """Raise ``MissingDependency`` (one line: how to install it) unless pyarrow imports."""
    _pyarrow()


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise MissingDependency('regionclip label needs pyarrow: pip install -e ".[label]" (or pip install pyarrow)') from None
    return pa, pq


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sources_sha256(keys: Sequence[str]) -> str:
    """One hash of the run's image list, in order: a changed input list is a different run."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def read_manifest(out: str | os.PathLike) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not a readable label manifest ({type(exc).__name__}); "
                       "pass --overwrite to start the run again") from None


def mismatch(old: dict, new: dict) -> str | None:
    """The first ``MUST_MATCH`` entry where ``old`` and ``new`` differ, or None."""
    for key in MUST_MATCH:
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(new.get(key), sort_keys=True):
            return key
    return None


def write_manifest(out: str | os.PathLike, manifest: dict) -> Path:
    return atomic_write_json(Path(out) / MANIFEST, {"format": FORMAT, **manifest})


def _schema(embeddings: bool):
    pa, _ = _pyarrow()
    fields = [("image", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
              ("boxes_xyxy", pa.list_(pa.list_(pa.float32(), 4))), ("labels", pa.list_(pa.string())),
              ("label_ids", pa.list_(pa.int32())), ("scores", pa.list_(pa.float32())), ("error", pa.string()),
              ("margins", pa.list_(pa.float32())), ("threshold_gaps", pa.list_(pa.float32())),
              ("near_miss", pa.float32()), ("priority", pa.float32())]
    if embeddings:
        fields.append(("embeddings", pa.list_(pa.list_(pa.float16()))))
    return pa.schema(fields)


def write_shard(out: str | os.PathLike, shard: Shard, rows: list[dict], embeddings: bool) -> Path:
    """Write ``rows`` (dicts of the columns above, numpy arrays allowed) as ``shard``'s file."""
    pa, pq = _pyarrow()
    if len(rows) != shard.size:
        raise ValueError(f"{shard.name}: {len(rows)} rows for a shard of {shard.size}")
    schema = _schema(embeddings)
    columns = {name: [] for name in schema.names}
    for r in rows:
        for name in schema.names:
            v = r.get(name)
            columns[name].append(v.tolist() if isinstance(v, np.ndarray) and name != "embeddings" else v)
    if embeddings:
        columns["embeddings"] = [None if e is None else [np.asarray(x, np.float16) for x in e]
                                 for e in columns["embeddings"]]
    table = pa.table(columns, schema=schema)
    path = Path(out) / shard.name
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def finished_shard(out: str | os.PathLike, shard: Shard, keys: Sequence[str]) -> int | None:
    """The number of undecodable images in ``shard``'s file when it reads as Parquet and holds
    exactly ``keys`` (its images, in order); None when it is not complete.

    A file cut by hand, overwritten with other rows, or from another image list is not complete.
    """
    pa, pq = _pyarrow()
    path = Path(out) / shard.name
    if not path.is_file():
        return None
    try:
        if pq.read_metadata(path).num_rows != len(keys):
            return None
        table = pq.read_table(path, columns=["image", "error"])
        if table.column("image").to_pylist() != list(keys):
            return None
        return len(keys) - table.column("error").null_count
    except (OSError, pa.ArrowException):
        return None


def read_label_rows(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """A ``regionclip label --out`` folder as ``(manifest, rows)``: every row of every shard, in
    the run's order (``records.load_results`` makes ``Results`` of them; this module stays below
    ``records`` in the layers).

    Raises ``BadInput`` when the folder has no manifest or a shard is missing or unreadable
    (the run has not finished: run the same command again).
    """
    pa, pq = _pyarrow()
    folder = Path(path)
    manifest = read_manifest(folder)
    if manifest is None:
        raise BadInput(f"{folder}: no {MANIFEST}; pass a `regionclip label --out` folder")
    n_shards = int(manifest.get("shards", 0))
    missing = [k for k in range(n_shards) if not (folder / f"shard-{k:05d}.parquet").is_file()]
    if missing:
        raise BadInput(f"{folder}: {len(missing)} of {n_shards} shards are not written yet (first: {missing[0]}); "
                       "run the same regionclip label command again to finish them")
    rows = []
    for k in range(n_shards):
        file = folder / f"shard-{k:05d}.parquet"
        try:
            rows += pq.read_table(file).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise BadInput(f"{file}: not a readable shard ({type(exc).__name__}); run the same regionclip label "
                           "command again to redo it") from None
    return manifest, rows
