"""``regionclip convert``: labelling results (``records.load_results``) into other tools' formats.

Each format is a module with ``write(results: Results, out: Path, **options) -> Path`` (the path
written), imported only when asked for, so a format's optional packages stay optional.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import BadInput
from ..records import Results, load_results

# format -> module under regionclip.convert, and what it writes
FORMATS = {
    "coco": ("coco", "COCO results JSON, or with --instances a full instances file (images, categories)"),
    "labelstudio": ("labelstudio", "Label Studio tasks JSON with predictions + the labelling config XML"),
    "cvat": ("cvat", "a COCO 1.0 archive (zip) CVAT imports as annotations"),
    "yolo": ("yolo", "a YOLO dataset folder: data.yaml, images/, labels/*.txt"),
}


def convert(results: str | os.PathLike | Results, to: str, out: str | os.PathLike, **options) -> Path:
    """Write ``results`` (a path ``load_results`` reads, or ``Results``) as format ``to`` at ``out``."""
    if to not in FORMATS:
        raise BadInput(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(results, Results):
        results = load_results(results)
    try:
        module = importlib.import_module(f"{__name__}.{FORMATS[to][0]}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(__name__):
            raise BadInput(f"--to {to} is not available in this version") from None
        raise
    return module.write(results, Path(out), **options)


def written_counts(results: Results, min_score: float | None = None) -> tuple[int, int]:
    """(images, boxes) that ``convert`` writes of ``results``: the decoded images (a task each for
    Label Studio) and their detections scoring at least ``min_score``."""
    from ._common import usable

    records = usable(results, min_score)
    return len(records), sum(len(r.scores) for r in records)
