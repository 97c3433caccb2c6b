"""Run a model over many image files in batches; bad files are reported, not fatal."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .detections import Detections
from .detector import RegionCLIP
from .errors import BadImage
from .io import LoadedImage


@dataclass
class ImageResult:
    """One input file: its decoded pixels and detections, or the reason it was skipped.

    ``image`` is what was decoded, reduced for very large files (``RegionCLIP.input_max_side``);
    ``detections`` are in original-image pixels. ``seconds`` is this image's share of its
    batch's detection time.
    """

    path: Path
    image: np.ndarray | None = None
    original_size: tuple[int, int] | None = None
    detections: Detections | None = None
    error: str | None = None
    seconds: float = 0.0

    def for_drawing(self) -> tuple[np.ndarray, Detections]:
        """``image`` and the detections in its pixels (they differ only for reduced images)."""
        d = self.detections
        (h, w), (oh, ow) = self.image.shape[:2], self.original_size
        if (h, w) == (oh, ow):
            return self.image, d
        scale = d.boxes_xyxy.new_tensor([w / ow, h / oh, w / ow, h / oh])
        return self.image, Detections(d.boxes_xyxy * scale, d.scores, d.label_ids, d.vocabulary)


def iter_detect(
    model: RegionCLIP,
    paths: Sequence[Path],
    labels: Sequence[str],
    batch_size: int = 8,
    **detect_kwargs,
) -> Iterator[ImageResult]:
    """Yield an ``ImageResult`` per path, in order. Unreadable files carry ``error`` and no detections."""
    pending: list[ImageResult] = []

    def flush() -> Iterator[ImageResult]:
        good = [r for r in pending if r.error is None]
        if good:
            start = time.perf_counter()
            dets = model.detect([LoadedImage(r.image, r.original_size) for r in good], labels,
                                batch_size=batch_size, **detect_kwargs)
            share = (time.perf_counter() - start) / len(good)
            for r, d in zip(good, dets):
                r.detections, r.seconds = d.cpu(), share
        yield from pending
        pending.clear()

    for path in paths:
        result = ImageResult(Path(path))
        try:
            (loaded,) = model.load([path])
            result.image, result.original_size = loaded.pixels, loaded.original_size
        except BadImage as exc:
            result.error = str(exc)
        pending.append(result)
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
