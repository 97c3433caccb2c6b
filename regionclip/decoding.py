"""The predictor's input side: sources decoded in ``DataLoader`` workers, a chunk ahead.

``decoded_chunks`` yields lists of ``Item`` s, ``chunk`` consecutive sources each, in input order,
whatever the number of workers; each worker decodes a source with ``io.decode``, as the Ray
engine's decoding stage does. Workers die with their parent.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .io import LoadedImage, decode
from .tiles import Tiling


@dataclass
class Item:
    index: int
    source: Any
    loaded: LoadedImage | None
    error: str | None
    boxes: Any = None


class _Decoded(IterableDataset):
    """Chunks of ``chunk`` consecutive sources, decoded. Worker w of W takes chunks w, w + W, ...;
    the DataLoader asks its workers in turn, so chunks come back in input order."""

    def __init__(self, sources: Iterable, boxes: Iterable | None, chunk: int, max_side: int | None,
                 tiling: Tiling | None = None):
        self.sources, self.boxes, self.chunk, self.max_side = sources, boxes, chunk, max_side
        self.tiling = tiling

    def __iter__(self) -> Iterator[list[Item]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pairs = zip(self.sources, self.boxes if self.boxes is not None else itertools.repeat(None))
        index = itertools.count()
        for k in itertools.count():
            part = list(itertools.islice(zip(index, pairs), self.chunk))
            if not part:
                return
            if k % workers == worker:
                yield [self._decode(i, source, boxes) for i, (source, boxes) in part]

    def _decode(self, i: int, source, boxes) -> Item:
        loaded, error = decode(source, self.max_side, self.tiling)
        return Item(i, source, loaded, error, boxes)


def decoded_chunks(sources: Iterable, boxes: Iterable | None, chunk: int, max_side: int | None, workers: int,
                   tiling: Tiling | None = None) -> Iterator[list[Item]]:
    """Lists of ``chunk`` decoded ``Item`` s in input order, decoded by ``workers`` processes
    (0: in this one), each image reduced to ``max_side`` (or opened for ``tiling``)."""
    dataset = _Decoded(sources, boxes, chunk, max_side, tiling)
    return iter(DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                           worker_init_fn=_DieWithParent() if workers else None))


def _as_is(chunk):
    return chunk


class _DieWithParent:
    """A DataLoader ``worker_init_fn``: on Linux the kernel kills the worker when the process that
    made it dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``; strictly, when the thread that started it
    ends). A parent killed by SIGKILL (a scheduler, the OOM killer) runs no clean-up, and a worker
    whose queue is full then hangs at exit for ever, joining its feeder thread, holding its memory.
    A no-op elsewhere."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        import sys

        if not sys.platform.startswith("linux"):
            return
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != self.parent:  # the parent died before the line above: no signal will come
            os._exit(1)
