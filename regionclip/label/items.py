"""A run's image list on disk: ``.items.jsonl`` in the output folder, read one shard at a time.

``sources.iter_sources`` expands the command's sources lazily; ``write_items`` streams them into
this file (one JSON value per line: a path, or ``[tar, member, offset, size]`` for a
``TarMember``) while it hashes and counts them, and keeps only the byte offset of each shard's
first line. Any process that sees the folder, a Ray worker on another machine included, then
reads a shard's items with one seek: no process holds the whole list, and a text list of a
million paths costs the driver one integer per shard, not a million strings.

Every process of a run writes the same file (``run.prepare``, after its checks) (the same sources give the same bytes) and replaces
it atomically: a process reading it meanwhile keeps the file it opened, which holds the same items.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from .shards import Shard
from .sources import TarMember

FILE = ".items.jsonl"


def _encode(item) -> bytes:
    value = [item.tar, item.name, item.offset, item.size] if isinstance(item, TarMember) else str(item)
    # json escapes the lone surrogates of file names that are not UTF-8, so they survive the round trip
    return json.dumps(value).encode("utf-8") + b"\n"


def _decode(line: bytes):
    value = json.loads(line)
    return TarMember(*value) if isinstance(value, list) else value


@dataclass(frozen=True)
class ItemList:
    """The run's items, on disk at ``path``: ``count`` of them, ``sha256`` their keys' hash
    (the manifest's ``sources_sha256``), ``offsets[k]`` the byte where shard ``k`` starts (``shard_size``
    items each). Small and picklable: it travels to Ray's workers instead of the items."""

    path: str
    count: int
    sha256: str
    shard_size: int
    offsets: tuple[int, ...]

    def shard(self, shard: Shard) -> list:
        """The items of ``shard``, in order."""
        return list(self.iter(shard))

    def iter(self, shard: Shard) -> Iterator:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[shard.index])
            for _ in range(shard.size):
                yield _decode(f.readline())

    def keys(self, shard: Shard) -> list[str]:
        return [str(it) for it in self.iter(shard)]


class ShardItems:
    """The items of ``shards`` in order, read lazily every time it is iterated: what
    ``Predictor.stream`` takes as sources (each decoding worker iterates its own copy)."""

    def __init__(self, items: ItemList, shards: Iterable[Shard]):
        self.items, self.shards = items, list(shards)

    def __iter__(self) -> Iterator:
        for s in self.shards:
            yield from self.items.iter(s)

    def __len__(self) -> int:
        return sum(s.size for s in self.shards)


def write_items(tmp: str | os.PathLike, items: Iterable, shard_size: int, path: str | os.PathLike) -> ItemList:
    """Stream ``items`` into the file ``tmp``, which the caller then renames to ``path``
    (``out/.items.jsonl``, once the run's checks pass); return the list as it will be there.
    The hash is the manifest's ``sources_sha256``: SHA-256 over each key (its ``str``) and a zero
    byte, in order, so a changed list, or a changed order, is another run."""
    digest, offsets, count, position = hashlib.sha256(), [], 0, 0
    with open(tmp, "wb") as f:
        for item in items:
            if count % shard_size == 0:
                offsets.append(position)
            line = _encode(item)
            f.write(line)
            position += len(line)
            digest.update(str(item).encode("utf-8", "surrogateescape") + b"\0")
            count += 1
    return ItemList(str(path), count, digest.hexdigest(), shard_size, tuple(offsets))
