"""Cutting the work into shards: fixed-size runs of consecutive items, in the sources' order.

Shard ``k`` holds items ``[k * size, (k + 1) * size)``; its file is ``shard-{k:05d}.parquet``.
Which process writes which shard: the ``--shard i/N`` part first (a SLURM array task, another
launcher), then the torchrun rank within it, round-robin, so any split of the same command
writes exactly the shards of one process, and each once. That holds only while every part uses the
same ``N`` (and, with ``N > 1``, the same world size): ``layout`` is what the manifest records of
the split, and ``check_layout`` refuses a command that would split it otherwise.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import BadInput


@dataclass(frozen=True)
class Shard:
    """Shard ``index``: items ``start`` to ``stop`` (exclusive) of the run's list."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}.parquet"


def plan(n_items: int, shard_size: int) -> list[Shard]:
    """All shards of ``n_items`` items, ``shard_size`` each (the last may be shorter)."""
    if shard_size < 1:
        raise BadInput(f"--shard-size must be at least 1, but got {shard_size}")
    return [Shard(k, start, min(start + shard_size, n_items))
            for k, start in enumerate(range(0, n_items, shard_size))]


def parse_part(spec: str | None) -> tuple[int, int]:
    """``--shard i/N`` -> ``(i, N)`` with ``0 <= i < N``; None -> ``(0, 1)``."""
    if spec is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if m is None or not int(m.group(1)) < int(m.group(2)):
        raise BadInput(f"--shard {spec!r}: expected i/N with 0 <= i < N, e.g. --shard 0/4 (SLURM: "
                       "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m.group(1)), int(m.group(2))


def env_rank() -> tuple[int, int]:
    """``(rank, world_size)`` as torchrun sets them (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` alone."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise BadInput("RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
    if not 0 <= rank < world:
        raise BadInput(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def assigned(shards: list[Shard], part: tuple[int, int], rank: int = 0, world: int = 1) -> list[Shard]:
    """The shards process ``rank`` of ``world`` writes within part ``i`` of ``N``."""
    i, n = part
    slot, slots = i * world + rank, n * world
    return [s for s in shards if s.index % slots == slot]


# How items and shards map to processes, in words, for whoever reads a manifest.
RULE = ("item j is in shard j // shard_size; shard k is written by part i (--shard i/parts), rank r (of "
        "world_size) when k % (parts * world_size) == i * world_size + r")


def layout(shard_size: int, part: tuple[int, int], world: int) -> dict:
    """The split of a run, as its manifest records it (``check_layout`` compares two)."""
    return {"shard_size": int(shard_size), "parts": int(part[1]), "world_size": int(world), "rule": RULE}


def check_layout(recorded: dict | None, wanted: dict, where: str) -> None:
    """Raise ``BadInput`` when ``wanted`` would split the run of ``where`` (its manifest) otherwise
    than ``recorded``: mixed, the parts skip some shards and write others twice. A one-part run
    covers every shard whatever its world size, so only ``--shard`` runs compare world sizes.
    ``recorded`` None (a manifest from before layouts were recorded) passes."""
    if recorded is None:
        return
    keys = ("shard_size", "parts", "world_size") if wanted["parts"] > 1 else ("shard_size", "parts")
    if all(recorded.get(k) == wanted[k] for k in keys):
        return

    def said(lay: dict) -> str:
        world = f" under WORLD_SIZE={lay.get('world_size')}" if lay.get("parts", 1) > 1 else ""
        return f"--shard i/{lay.get('parts')}{world} with --shard-size {lay.get('shard_size')}"

    raise BadInput(f"{where} was split as {said(recorded)}; this command asks for {said(wanted)}: mixed, the parts "
                   "would skip shards or write them twice; run it as the manifest says, or pass --overwrite to start "
                   "again")
