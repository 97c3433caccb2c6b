"""Cutting the work into shards: fixed-size runs of consecutive items, in the sources' order.

Shard ``k`` holds items ``[k * size, (k + 1) * size)``; its file is ``shard-{k:05d}.parquet``.
Which process writes which shard: the ``--shard i/N`` part first (a SLURM array task, another
launcher), then the torchrun rank within it, round-robin, so any split of the same command
writes exactly the shards of one process, and each once.
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
