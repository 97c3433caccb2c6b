"""Run a model over many image files in batches; bad files are reported, not fatal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .detections import Detections
from .detector import RegionCLIP
from .errors import BadImage
from .io import load_image


@dataclass
class ImageResult:
    """One input file: its pixels and detections, or the reason it was skipped."""

    path: Path
    image: np.ndarray | None = None
    detections: Detections | None = None
    error: str | None = None


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
            dets = model.detect([r.image for r in good], labels, batch_size=batch_size, **detect_kwargs)
            for r, d in zip(good, dets):
                r.detections = d.cpu()
        yield from pending
        pending.clear()

    for path in paths:
        result = ImageResult(Path(path))
        try:
            result.image = load_image(path)
        except BadImage as exc:
            result.error = str(exc)
        pending.append(result)
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
