"""``Batcher``: one worker thread runs the predictor; concurrent requests share its batches.

Request threads ``submit`` decoded images and wait on a ``Future``. The worker takes the oldest
waiting job, gives others up to ``max_wait`` seconds to arrive, and runs every waiting job with
the same vocabulary and scoring (up to ``max_batch``) as one ``Predictor.stream`` call, so eight
clients asking at once cost about one batch, not eight. The queue is bounded twice: past
``max_queue`` waiting jobs, or past ``max_bytes`` of decoded images waiting or running,
``submit`` raises ``Busy`` (a 503 for the client to retry) instead of letting latency and memory
grow without end. ``reserve`` counts an image's bytes from its header on, before it is decoded.
A job whose future was cancelled (its client gave up waiting) is dropped, never computed. The
labels' text embeddings are encoded once and kept (``cache_size`` vocabularies, least recently
used dropped first).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import RegionClipError
from ..vocabulary import Vocabulary


class Busy(RegionClipError):
    """The server's queue is full; retry later."""

    exit_code = 1


class Room:
    """``nbytes`` of one decoded image, counted against the batcher's ``max_bytes`` until released."""

    def __init__(self, batcher: Batcher, nbytes: int) -> None:
        self._batcher, self.nbytes, self._held = batcher, nbytes, True

    def release(self) -> None:
        """Stop counting these bytes (again: nothing)."""
        with self._batcher._cond:
            if self._held:
                self._held = False
                self._batcher.bytes_held -= self.nbytes


@dataclass
class _Job:
    pixels: np.ndarray
    key: tuple  # (labels, scoring items): jobs with equal keys can share a batch
    room: Room
    future: Future = field(default_factory=Future)


class Batcher:
    """Runs ``predictor`` (a ``Predictor``) over jobs from many threads, in shared batches."""

    def __init__(self, predictor, *, max_batch: int = 8, max_queue: int = 64, max_bytes: int = 1_000_000_000,
                 max_wait: float = 0.01, cache_size: int = 32) -> None:
        self.predictor, self.max_batch, self.max_queue, self.max_wait = predictor, max_batch, max_queue, max_wait
        self.max_bytes = max_bytes
        self.bytes_held = 0  # decoded images reserved, waiting or running
        self.cache_size = cache_size
        self._text: OrderedDict[tuple, object] = OrderedDict()
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # batches run so far (tests and /health read it)
        self.encoded = 0  # vocabularies encoded so far (a cache miss each)
        self._thread = threading.Thread(target=self._work, name="regionclip-batcher", daemon=True)
        self._thread.start()

    def reserve(self, nbytes: int) -> Room:
        """Count ``nbytes`` (an image about to be decoded) against ``max_bytes``; ``Busy`` when they
        do not fit beside what is held (one image alone always fits)."""
        with self._cond:
            self._drop_cancelled()
            if self.bytes_held and self.bytes_held + nbytes > self.max_bytes:
                raise Busy(f"the images queued hold {self.bytes_held / 1e6:.0f} MB already; retry in a moment")
            self.bytes_held += nbytes
            return Room(self, nbytes)

    def submit(self, pixels: np.ndarray, labels: Sequence[str] | Vocabulary, *, room: Room | None = None,
               **scoring) -> Future:
        """Queue one HxWx3 uint8 RGB image with plain ``labels`` or a ``Vocabulary`` (synonyms,
        negatives, thresholds, exemplars); the future's result is its ``Detections`` (on the CPU).
        ``room``: the image's bytes from ``reserve`` (reserved here when None); the job releases
        it when done, or at once when it is not queued. Cancel the future to drop the job."""
        what = labels if isinstance(labels, Vocabulary) else tuple(labels)
        room = room or self.reserve(pixels.nbytes)
        job = _Job(pixels, (what, tuple(sorted((k, v) for k, v in scoring.items() if v is not None))), room)
        with self._cond:
            self._drop_cancelled()
            if self._closed or len(self._jobs) >= self.max_queue:
                room.release()
                raise Busy("the server is shutting down" if self._closed else
                           f"{len(self._jobs)} requests are waiting already; retry in a moment")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def text_embeddings(self, labels: tuple | Vocabulary):
        """The labels' (L, D) embeddings, or a vocabulary compiled (text and exemplars), made on
        first use and cached (a ``Vocabulary`` is keyed by its manifest: equal files share)."""
        key = _vocab_key(labels) if isinstance(labels, Vocabulary) else labels
        if key in self._text:
            self._text.move_to_end(key)
            return self._text[key]
        emb = self.predictor.compile(labels) if isinstance(labels, Vocabulary) else \
            self.predictor.vocabulary(list(labels))[1]
        self.encoded += 1
        self._text[key] = emb
        while len(self._text) > self.cache_size:
            self._text.popitem(last=False)
        return emb

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, finish those queued, end the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _drop_cancelled(self) -> None:
        """Forget the waiting jobs whose clients gave up (with ``_cond`` held)."""
        for j in [j for j in self._jobs if j.future.cancelled()]:
            self._jobs.remove(j)
            j.room.release()

    def _take(self) -> list[_Job] | None:
        """The next batch (possibly empty: all of it cancelled meanwhile); None once closed and empty."""
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            # a short wait for company: the jobs of clients that send together end up in one batch
            while len(self._jobs) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            self._drop_cancelled()
            first = self._jobs[0] if self._jobs else None
            batch = [j for j in self._jobs if first is not None and j.key == first.key][: self.max_batch]
            for j in batch:
                self._jobs.remove(j)
        running = []
        for j in batch:  # a job cancelled since the drop above is not run either
            if j.future.set_running_or_notify_cancel():
                running.append(j)
            else:
                j.room.release()
        return running

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            try:
                if batch:
                    self._run(batch)
            finally:
                for j in batch:
                    j.room.release()

    def _run(self, batch: list[_Job]) -> None:
        labels, scoring = batch[0].key
        try:
            emb = self.text_embeddings(labels)
            vocab = {"vocab": emb} if isinstance(labels, Vocabulary) else \
                {"labels": list(labels), "text_embeddings": emb}
            preds = list(self.predictor.stream([j.pixels for j in batch], **vocab,
                                               batch_size=len(batch), num_workers=0, **dict(scoring)))
            self.batches += 1
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear of it
            for j in batch:
                j.future.set_exception(exc)
            return
        for j, p in zip(batch, preds):
            if p.error is not None:
                j.future.set_exception(RegionClipError(p.error))
            else:
                j.future.set_result(p.detections.cpu())


def _vocab_key(vocab: Vocabulary) -> tuple:
    return ("vocab", json.dumps(vocab.to_manifest(), sort_keys=True))
