"""``Predictor``: sources in, ``Detections`` out, streaming.

The predictor feeds a backend (``backend.TorchBackend`` over a ``RegionCLIPModel``, or the ONNX
runtime ``onnx.runtime.OnnxDetector``): it decodes images in ``DataLoader`` workers a chunk
ahead (``decoding``), hands the backend one chunk of ``batch_size`` consecutive inputs at a time, and yields
one ``Prediction`` per input, in input order. Memory holds a few chunks, never the whole input
list, so a folder of a million images streams like one of ten. It also owns the vocabulary
(labels or stored embeddings, resolved once per call) and the scoring overrides.

``stream`` is the iterator every job builds on (``detect`` in the CLI and the API, ``eval``,
bulk labelling, a server); ``detect`` and ``classify`` collect it into lists.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from .decoding import Item as _Item
from .decoding import decoded_chunks
from .detections import Detections
from .errors import BadImage, BadInput
from .tiles import TiledImage, Tiling, check_tiling, detect_tiled


@dataclass
class Prediction:
    """One input: its detections (or probabilities), or the reason it was skipped.

    ``source`` is the input as given and ``index`` its position. ``detections`` are in
    original-image pixels, on the backend's device. ``image`` (with ``keep_images``) is what
    was decoded, reduced for very large files. ``seconds`` is this image's share of its chunk's
    time. ``proposals``: ``(boxes_xyxy, objectness)`` in original pixels, when asked for.
    ``runs``: ``stream_runs``' detections, one per run.
    """

    source: Any
    index: int
    original_size: tuple[int, int] | None = None
    detections: Detections | None = None
    probabilities: torch.Tensor | None = None
    image: np.ndarray | None = None
    error: str | None = None
    seconds: float = 0.0
    proposals: tuple[torch.Tensor, torch.Tensor] | None = None
    runs: list[Detections] | None = None  # ``Predictor.stream_runs``: one per run

    @property
    def path(self) -> Path | None:
        return Path(self.source) if isinstance(self.source, (str, os.PathLike)) else None

    def for_drawing(self) -> tuple[np.ndarray, Detections]:
        """``image`` and the detections in its pixels (they differ only for reduced images)."""
        d = self.detections
        (h, w), (oh, ow) = self.image.shape[:2], self.original_size
        if (h, w) == (oh, ow):
            return self.image, d
        scale = d.boxes_xyxy.new_tensor([w / ow, h / oh, w / ow, h / oh])
        return self.image, Detections(d.boxes_xyxy * scale, d.scores, d.label_ids, d.vocabulary)


class ResolvedVocabulary(NamedTuple):
    """A call's vocabulary, embedded: ``names`` (the detections' labels), ``embeddings`` ((C + M + K,
    D) unit rows: classes, negatives, distractors) and ``rules`` (None for plain labels).
    ``Predictor.resolve`` makes it; ``stream`` takes it as ``labels`` and embeds nothing again,
    so a caller that streams many calls (a Ray actor, batch after batch) pays for it once."""

    names: list[str]
    embeddings: Any
    rules: Any = None


# detect() and classify() of a list group this many images by aspect ratio at a time: as the whole
# list for lists this long (how they batched before streaming), a bounded memory for longer ones.
LIST_WINDOW = 64


def _check_count(name: str, value, least: int) -> int:
    if int(value) < least:
        raise BadInput(f"{name} must be at least {least}, but got {value}")
    return int(value)


class Predictor:
    """Streams sources (paths, PIL images, HxWx3 arrays, tensors, ``LoadedImage``) through a backend.

    ``batch_size``: consecutive inputs per chunk (one padded batch per aspect group);
    ``num_workers``: DataLoader processes decoding ahead (0: in this process). Both can be
    overridden per call. Attributes the predictor lacks come from the backend (e.g. an ONNX
    export's ``predict``).
    """

    def __init__(self, backend, *, batch_size: int = 8, num_workers: int = 0):
        self.backend = backend
        self.batch_size = _check_count("batch_size", batch_size, 1)
        self.num_workers = _check_count("num_workers", num_workers, 0)

    @classmethod
    def from_pretrained(cls, name_or_path: str, overrides: Sequence[str] = (), *, batch_size: int = 8,
                        num_workers: int = 0, **model_kwargs) -> Predictor:
        """A torch model from a preset or YAML (``RegionCLIPModel.from_pretrained``) behind a predictor."""
        from .backend import TorchBackend
        from .model import RegionCLIPModel

        model = RegionCLIPModel.from_pretrained(name_or_path, overrides, **model_kwargs)
        return cls(TorchBackend(model), batch_size=batch_size, num_workers=num_workers)

    @classmethod
    def from_onnx(cls, folder: str | os.PathLike, *, batch_size: int = 8, num_workers: int = 0,
                  **kwargs) -> Predictor:
        """An ONNX export (``regionclip export``) run with onnxruntime; keywords go to
        ``onnx.OnnxDetector`` (``device``, ``threads``, ``verify``)."""
        from .onnx.runtime import OnnxDetector

        return cls(OnnxDetector(folder, **kwargs), batch_size=batch_size, num_workers=num_workers)

    def __getattr__(self, name: str):
        if name == "backend":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.backend, name)

    @property
    def input_max_side(self) -> int | None:
        return self.backend.input_max_side

    def scoring_config(self, **overrides):
        return self.backend.scoring_config(**overrides)

    def vocabulary(self, labels: Sequence[str] | None, text_embeddings=None):
        return self.backend.vocabulary(labels, text_embeddings)

    def encode_text(self, labels: Sequence[str]):
        return self.backend.encode_text(labels)

    def compile(self, vocab, exemplars=()):
        """A ``Vocabulary`` (or YAML path / dict; ``exemplars`` added as ``Vocabulary.resolve`` does)
        embedded by this backend: ``exemplars.CompiledVocabulary`` (names, embeddings, rules)."""
        from .exemplars import compile_vocabulary
        from .vocabulary import Vocabulary

        v = Vocabulary.resolve(vocab=vocab, exemplars=exemplars) if vocab is not None else \
            Vocabulary.resolve(exemplars=exemplars)
        if v is None:
            raise BadInput("pass a vocabulary or exemplars to compile")
        return compile_vocabulary(v, self.backend)

    def resolve(self, labels=None, *, text_embeddings=None, vocab=None, exemplars=(),
                distractors=None) -> ResolvedVocabulary:
        """The vocabulary ``stream`` would use for these arguments (see there), embedded now, once."""
        return ResolvedVocabulary(*self._vocab(labels, text_embeddings, vocab, exemplars, distractors))

    def _vocab(self, labels, text_embeddings, vocab, exemplars, distractors=None):
        """``(names, embeddings, rules)`` for one call: plain labels / stored embeddings as
        ``vocabulary``; a ``Vocabulary`` (also as ``labels``) or ``exemplars`` compiled; then the
        distractors (``distractors``: this call's, else the vocabulary's, else the model's) appended.
        A ``ResolvedVocabulary`` as ``labels`` is used as it is."""
        from .exemplars import CompiledVocabulary
        from .vocabulary import Vocabulary

        if isinstance(labels, ResolvedVocabulary):
            if text_embeddings is not None or vocab is not None or exemplars or distractors is not None:
                raise BadInput("a resolved vocabulary already holds its embeddings and distractors: pass it alone")
            return tuple(labels)
        if isinstance(labels, Vocabulary):
            labels, vocab = None, labels if vocab is None else vocab
        if isinstance(vocab, CompiledVocabulary) and labels is None and not exemplars:
            # compiled once by the caller (a server's cache)
            return self._distract(vocab.names, vocab.embeddings, vocab.rules, vocab.vocabulary, distractors)
        if vocab is None and not exemplars:
            names, emb = self.vocabulary(labels, text_embeddings)
            return self._distract(names, emb, None, None, distractors)
        if text_embeddings is not None:
            raise BadInput("text_embeddings replace encoding plain labels; with a vocabulary or exemplars "
                           "give the classes there instead")
        if vocab is not None and labels is not None:
            raise BadInput("give labels or a vocabulary, not both")
        v = Vocabulary.resolve(labels=labels, vocab=vocab, exemplars=exemplars)
        c = self.compile(v)
        return self._distract(c.names, c.embeddings, c.rules, v, distractors)

    def _distract(self, names, emb, rules, vocab, distractors):
        from . import distractors as D

        from .exemplars import VocabRules

        spec = distractors if distractors is not None else getattr(vocab, "distractors", None)
        terms = [t for c in vocab.classes for t in c.prompts] + vocab.negatives if vocab is not None else []
        emb, count = D.attach(self.backend, names, emb, terms, spec)
        if count:
            base = rules if rules is not None else VocabRules()
            rules = VocabRules(base.num_negatives, base.thresholds, num_distractors=count)
        return names, emb, rules

    # --------------------------------------------------------------------------------- stream
    def _chunks(self, sources: Iterable, boxes: Iterable | None, batch_size: int | None, num_workers: int | None,
                window: int | None, tiling: Tiling | None = None) -> tuple[Iterator[list[_Item]], int]:
        """(decoded chunks of ``window`` inputs, the batch size) with the counts checked."""
        size = _check_count("batch_size", self.batch_size if batch_size is None else batch_size, 1)
        workers = _check_count("num_workers", self.num_workers if num_workers is None else num_workers, 0)
        chunk = size if window is None else max(size, _check_count("window", window, 1))
        return decoded_chunks(sources, boxes, chunk, self.backend.input_max_side, workers, tiling), size

    def stream(self, sources: Iterable, labels: Sequence[str] | None = None, *, boxes: Iterable | None = None,
               text_embeddings=None, batch_size: int | None = None, num_workers: int | None = None,
               keep_images: bool = False, proposals: bool = False, window: int | None = None,
               vocab=None, exemplars=(), distractors=None, tile: int | None = None,
               tile_overlap: float | None = None, **scoring) -> Iterator[Prediction]:
        """Yield a ``Prediction`` per source, in order, as each chunk finishes.

        ``labels`` / ``text_embeddings``: the vocabulary (``vocabulary``), resolved once (or
        already: a ``ResolvedVocabulary`` from ``resolve``).
        ``boxes``: per source, (N, 4) xyxy boxes in original pixels that replace the proposals
        (each comes back with its top-k labels, unfiltered). Unreadable sources yield a
        ``Prediction`` with ``error`` and are not fatal. Scoring keywords (``score_threshold``,
        ``nms_iou``, ``max_detections``, ``top_k``, ``agnostic_nms``) override the model's.
        Everything is checked before the first image is decoded. ``sources`` may be any
        iterable; with ``num_workers`` > 0 every worker iterates it (a list, or a generator
        that can be repeated in a forked process, such as paths). ``window``: inputs decoded
        and grouped by aspect ratio together (default ``batch_size``: each batch is the next
        ``batch_size`` inputs); a larger window pads less and holds more images in memory.
        ``vocab`` (a ``vocabulary.Vocabulary``, a YAML path or a dict; ``labels`` may be a
        ``Vocabulary`` too) and ``exemplars`` (``Vocabulary.resolve``): classes with prompts,
        exemplars, negatives and thresholds, compiled once here (``compile``). ``distractors``
        (``regionclip.distractors``): names scored beside the labels and never reported, so an
        unlisted object is not given a listed name: ``"default"``/None (the vocabulary's, else the
        model's: the demo's own 12 names, a CLIP preset's common objects), ``"none"``, ``"labels"``,
        ``"common"``, a file or a list of names. ``tile`` (a window side in original pixels) and
        ``tile_overlap`` (its share neighbours share, default 0.2): detect in each image larger than
        a window by windows, ``batch_size`` windows a batch, plus one pass over the whole image,
        merged (``regionclip.tiles``); ``max_detections`` then counts the whole image's boxes.
        """
        tiling = check_tiling(tile, tile_overlap)
        if tiling is not None and boxes is not None:
            raise BadInput("tile is for detecting with proposals; given boxes are classified in the whole image")
        cfg = self.scoring_config(**scoring)
        labels, text_emb, rules = self._vocab(labels, text_embeddings, vocab, exemplars, distractors)
        chunks, size = self._chunks(sources, boxes, batch_size, num_workers, window, tiling)  # checks the counts now
        return self._stream(chunks, size, labels, text_emb, cfg, boxes is not None, keep_images, proposals, rules)

    # A decorated generator runs each step in inference mode and leaves the caller's mode alone
    # between items (a `with` inside the generator would leak it to the consumer's loop body).
    @torch.inference_mode()
    def _stream(self, chunks, size: int, labels, text_emb, cfg, given: bool, keep_images: bool,
                proposals: bool, rules=None) -> Iterator[Prediction]:
        extra = {"rules": rules} if rules is not None else {}  # backends of before take no rules

        def run(loaded):
            return [([d], found) for d, found in self.backend.detect_chunk(loaded, labels, text_emb, cfg, None,
                                                                            proposals, size, **extra)]

        for items in chunks:
            good = [it for it in items if it.error is None and not isinstance(it.loaded, TiledImage)]
            results, share = [], 0.0
            if good:
                start = time.perf_counter()
                boxes = [self._boxes(it.boxes) for it in good] if given else None
                results = self.backend.detect_chunk([it.loaded for it in good], labels, text_emb, cfg,
                                                    boxes, proposals, size, **extra)
                share = (time.perf_counter() - start) / len(good)
            done = iter(results)
            for it in items:
                if isinstance(it.loaded, TiledImage):
                    p, tiled = self._tiled(it, run, [cfg], size, keep_images)
                    if tiled is not None:
                        p.detections, p.proposals = tiled.detections[0], tiled.proposals if proposals else None
                    yield p
                    continue
                p = self._prediction(it, keep_images)
                if it.error is None:
                    p.detections, p.proposals = next(done)
                    p.seconds = share
                yield p

    def _tiled(self, it: _Item, run, configs, size: int, keep_images: bool):
        """``(Prediction, tiles.TiledResult or None)`` of an image detected by tiles; an image that
        fails to decode (it is decoded only now) gets its ``error`` instead."""
        start = time.perf_counter()
        try:
            result = detect_tiled(it.loaded, run, configs, size)
        except BadImage as exc:
            return Prediction(it.source, it.index, error=str(exc)), None
        p = Prediction(it.source, it.index, it.loaded.original_size, image=result.pixels if keep_images else None,
                       seconds=time.perf_counter() - start)
        return p, result

    def stream_runs(self, sources: Iterable, runs: Sequence[dict], *, batch_size: int | None = None,
                    num_workers: int | None = None, tile: int | None = None,
                    tile_overlap: float | None = None) -> Iterator[Prediction]:
        """Like ``stream``, for several vocabularies and selections at once: each run is a dict of
        ``stream``'s keywords (``labels``, ``vocab``, ``distractors``, scoring overrides). Each
        ``Prediction``'s ``runs`` holds one ``Detections`` per run, in order. A backend with
        ``detect_runs`` (the torch one) proposes and embeds each image once for all runs; others run
        each vocabulary in turn. ``tile`` / ``tile_overlap`` as in ``stream``: the windows are run
        once for all runs, and each run's boxes merged with its own settings."""
        tiling = check_tiling(tile, tile_overlap)
        if not runs:
            raise BadInput("stream_runs needs at least one run")
        resolved = []
        for run in runs:
            run = dict(run)
            names, emb, rules = self._vocab(run.pop("labels", None), run.pop("text_embeddings", None),
                                            run.pop("vocab", None), run.pop("exemplars", ()), run.pop("distractors", None))
            resolved.append((names, emb, self.scoring_config(**run), rules))
        chunks, size = self._chunks(sources, None, batch_size, num_workers, None, tiling)
        return self._stream_runs(chunks, size, resolved)

    @torch.inference_mode()
    def _stream_runs(self, chunks, size: int, runs) -> Iterator[Prediction]:
        many = getattr(self.backend, "detect_runs", None)

        def run(loaded):
            if many is not None:
                return [(dets, None) for dets in many(loaded, runs, size)]
            each = [self.backend.detect_chunk(loaded, labels, emb, cfg, None, False, size,
                                              **({"rules": rules} if rules is not None else {}))
                    for labels, emb, cfg, rules in runs]
            return [([r[k][0] for r in each], None) for k in range(len(loaded))]

        for items in chunks:
            good = [it for it in items if it.error is None and not isinstance(it.loaded, TiledImage)]
            done = iter([dets for dets, _ in run([it.loaded for it in good])] if good else [])
            for it in items:
                if isinstance(it.loaded, TiledImage):
                    p, tiled = self._tiled(it, run, [cfg for _, _, cfg, _ in runs], size, False)
                    if tiled is not None:
                        p.runs = tiled.detections
                    yield p
                    continue
                p = self._prediction(it, False)
                if it.error is None:
                    p.runs = next(done)
                yield p

    def _boxes(self, b):
        check = getattr(self.backend, "check_boxes", None)
        if check is None:
            raise BadInput("this backend detects with its own proposals only; classify given boxes with "
                           "RegionCLIP.from_pretrained(...).detect(images, labels, boxes)")
        return check(b)

    @staticmethod
    def _prediction(it: _Item, keep_images: bool) -> Prediction:
        if it.error is not None:
            return Prediction(it.source, it.index, error=it.error)
        return Prediction(it.source, it.index, it.loaded.original_size,
                          image=it.loaded.pixels if keep_images else None)

    def iter_classify(self, sources: Iterable, labels: Sequence[str] | None, boxes: Iterable, *,
                      text_embeddings=None, batch_size: int | None = None,
                      num_workers: int | None = None, window: int | None = None,
                      vocab=None, exemplars=()) -> Iterator[Prediction]:
        """Per source, a ``Prediction`` whose ``probabilities`` are the (N, L) matrix of its
        given ``boxes`` (N, 4 xyxy, original pixels) over ``labels``: the GT-box protocol's input.
        With ``vocab`` / ``exemplars`` the columns are its classes (negatives share the softmax)."""
        labels, text_emb, _ = self._vocab(labels, text_embeddings, vocab, exemplars)
        chunks, size = self._chunks(sources, boxes, batch_size, num_workers, window)
        return self._classify(chunks, size, labels, text_emb)

    @torch.inference_mode()
    def _classify(self, chunks, size: int, labels, text_emb) -> Iterator[Prediction]:
        for items in chunks:
            good = [it for it in items if it.error is None]
            probs = iter(self.backend.classify_chunk([it.loaded for it in good], labels, text_emb,
                                                     [self._boxes(it.boxes) for it in good], size)
                         if good else [])
            for it in items:
                p = self._prediction(it, False)
                if it.error is None:
                    p.probabilities = next(probs)
                yield p

    # ------------------------------------------------------------------------------- collect
    def detect(self, images, labels: Sequence[str] | None = None, boxes=None, *, text_embeddings=None,
               batch_size: int | None = None, num_workers: int | None = None,
               proposals_out: list | None = None, window: int | None = LIST_WINDOW,
               vocab=None, exemplars=(), distractors=None, tile: int | None = None,
               tile_overlap: float | None = None, **scoring) -> Detections | list[Detections]:
        """Detect ``labels`` in one image (returns ``Detections``) or a list (returns a list).

        ``boxes`` (N, 4 xyxy pixels, or a list of them for a list of images) skips the proposal
        stage. ``proposals_out`` (a list) receives each image's proposals, in input order. An
        unreadable image raises ``BadImage``. See ``stream`` for the rest (``window``: up to
        ``LIST_WINDOW`` images are grouped by aspect ratio together; ``tile``, ``tile_overlap``:
        small objects in large images, by windows).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if boxes is not None:
            boxes = [boxes] if single else list(boxes)
            if len(boxes) != len(items):
                raise BadInput(f"got {len(items)} images but {len(boxes)} box lists")
            boxes = [self._boxes(b) for b in boxes]
        out, found = [], []
        for p in self.stream(items, labels, boxes=boxes, text_embeddings=text_embeddings, batch_size=batch_size,
                             num_workers=num_workers, proposals=proposals_out is not None and boxes is None,
                             window=window, vocab=vocab, exemplars=exemplars, distractors=distractors,
                             tile=tile, tile_overlap=tile_overlap, **scoring):
            if p.error is not None:
                raise BadImage(p.error)
            out.append(p.detections)
            found.append(p.proposals)
        if proposals_out is not None and boxes is None:
            proposals_out += found
        return out[0] if single else out

    def classify(self, images: Sequence, labels: Sequence[str] | None, boxes: Sequence, batch_size: int | None = None,
                 *, text_embeddings=None, num_workers: int | None = None,
                 window: int | None = LIST_WINDOW, vocab=None, exemplars=()) -> list[torch.Tensor]:
        """Per image, the (N, L) probability matrix of its given ``boxes`` (``iter_classify``).
        Rows sum to less than 1 where the softmax also ran over a background column, negatives or
        distractors (dropped: ``1 - row.sum()`` is their share; ``RegionCLIP.classify``)."""
        out = []
        for p in self.iter_classify(list(images), labels, list(boxes), text_embeddings=text_embeddings,
                                    batch_size=batch_size, num_workers=num_workers, window=window,
                                    vocab=vocab, exemplars=exemplars):
            if p.error is not None:
                raise BadImage(p.error)
            out.append(p.probabilities)
        return out
