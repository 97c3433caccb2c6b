"""``Batcher``: one worker thread runs the predictor; concurrent requests share its batches.

Request threads ``submit`` decoded images and wait on a ``Future``. The worker takes the oldest
waiting job, gives others up to ``max_wait`` seconds to arrive, and runs every waiting job with
the same vocabulary and scoring (up to ``max_batch``) as one ``Predictor.stream`` call, so eight
clients asking at once cost about one batch, not eight. The queue is bounded: past ``max_queue``
waiting jobs ``submit`` raises ``Busy`` (a 503 for the client to retry) instead of letting
latency and memory grow without end. The labels' text embeddings are encoded once and kept
(``cache_size`` vocabularies, least recently used dropped first).
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


@dataclass
class _Job:
    pixels: np.ndarray
    key: tuple  # (labels, scoring items): jobs with equal keys can share a batch
    future: Future = field(default_factory=Future)


class Batcher:
    """Runs ``predictor`` (a ``Predictor``) over jobs from many threads, in shared batches."""

    def __init__(self, predictor, *, max_batch: int = 8, max_queue: int = 64, max_wait: float = 0.01,
                 cache_size: int = 32) -> None:
        self.predictor, self.max_batch, self.max_queue, self.max_wait = predictor, max_batch, max_queue, max_wait
        self.cache_size = cache_size
        self._text: OrderedDict[tuple, object] = OrderedDict()
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # batches run so far (tests and /health read it)
        self.encoded = 0  # vocabularies encoded so far (a cache miss each)
        self._thread = threading.Thread(target=self._work, name="regionclip-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray, labels: Sequence[str] | Vocabulary, **scoring) -> Future:
        """Queue one HxWx3 uint8 RGB image with plain ``labels`` or a ``Vocabulary`` (synonyms,
        negatives, thresholds, exemplars); the future's result is its ``Detections`` (on the CPU)."""
        what = labels if isinstance(labels, Vocabulary) else tuple(labels)
        job = _Job(pixels, (what, tuple(sorted((k, v) for k, v in scoring.items() if v is not None))))
        with self._cond:
            if self._closed:
                raise Busy("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise Busy(f"{len(self._jobs)} requests are waiting already; retry in a moment")
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

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._jobs[0]
            deadline = time.monotonic() + self.max_wait
            # a short wait for company: the jobs of clients that send together end up in one batch
            while len(self._jobs) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            batch = [j for j in self._jobs if j.key == first.key][: self.max_batch]
            for j in batch:
                self._jobs.remove(j)
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
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
                continue
            for j, p in zip(batch, preds):
                if p.error is not None:
                    j.future.set_exception(RegionClipError(p.error))
                else:
                    j.future.set_result(p.detections.cpu())


def _vocab_key(vocab: Vocabulary) -> tuple:
    return ("vocab", json.dumps(vocab.to_manifest(), sort_keys=True))
