"""``regionclip convert``: labelling results (``records.load_results``) into other tools' formats,
and what people corrected in those tools (``read``) back into COCO instances to train and evaluate on.

Each format is a module with ``write(results: Results, out: Path, **options) -> Path`` (the path
written), imported only when asked for, so a format's optional packages stay optional.
``most_doubtful=N`` / ``doubt_first=True`` hand any format the images in review order
(``regionclip.doubt``): the N most doubtful, or all, most doubtful first.

Three of them read the tools' exports too, ``read(path, **options) -> Results`` (``annotated``:
people's boxes, scores 1): ``labelstudio`` (the JSON export), ``cvat`` (a COCO 1.0 zip), ``yolo``
(a dataset folder). ``read`` picks the reader from what ``path`` is (``detect_source``).
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


# what `convert` reads: regionclip's own outputs, or a tool's export
SOURCES = ("regionclip", "labelstudio", "cvat", "yolo")


def detect_source(path: Path) -> str:
    """Which of ``SOURCES`` ``path`` is: a ``.zip`` is CVAT's, a folder with ``data.yaml`` (or the
    yaml) a YOLO dataset, a JSON list of tasks with ``data`` Label Studio's export; the rest is ours
    (a ``label`` folder or a ``detect --json`` file, which ``load_results`` checks)."""
    if path.is_file() and path.suffix.lower() == ".zip":
        return "cvat"
    if (path.is_dir() and (path / "data.yaml").is_file() and not (path / "manifest.json").is_file()) or \
            (path.is_file() and path.suffix.lower() in (".yaml", ".yml")):
        return "yolo"
    if path.is_file() and path.suffix.lower() == ".json":
        from ._common import read_json

        data = read_json(path, "JSON file")
        if isinstance(data, list) and data and isinstance(data[0], dict) and "data" in data[0]:
            return "labelstudio"
    return "regionclip"


def read(path: str | os.PathLike, source: str | None = None, **options) -> Results:
    """``Results`` from ``path``: regionclip's own outputs (``load_results``) or, read by the
    format's ``read``, a tool's export of people's boxes. ``source``: one of ``SOURCES``, else
    ``detect_source``'s guess. ``options`` go to the reader (unknown ones are ignored)."""
    path = Path(path)
    if not path.exists():
        return load_results(path)  # its one line says what it takes
    source = source or detect_source(path)
    if source not in SOURCES:
        raise BadInput(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "regionclip":
        return load_results(path)
    return importlib.import_module(f"{__name__}.{FORMATS[source][0]}").read(path, **options)


def in_review_order(results: Results, most_doubtful: int | None = None, doubt_first: bool = False) -> Results:
    """``results`` as written: unchanged, or with ``most_doubtful`` (N) / ``doubt_first`` its
    decodable images most doubtful first (``doubt.reorder``), the N first only."""
    if most_doubtful is not None and int(most_doubtful) < 1:
        raise BadInput(f"--most-doubtful must be at least 1, but got {most_doubtful}")
    if most_doubtful is None and not doubt_first:
        return results
    from ..doubt import reorder

    return reorder(results, most_doubtful)


def convert(results: str | os.PathLike | Results, to: str, out: str | os.PathLike, *,
            most_doubtful: int | None = None, doubt_first: bool = False, **options) -> Path:
    """Write ``results`` (a path ``load_results`` reads, or ``Results``) as format ``to`` at
    ``out``, in review order with ``most_doubtful`` / ``doubt_first`` (``in_review_order``)."""
    if to not in FORMATS:
        raise BadInput(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(results, Results):
        results = load_results(results)
    results = in_review_order(results, most_doubtful, doubt_first)
    try:
        module = importlib.import_module(f"{__name__}.{FORMATS[to][0]}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(__name__):
            raise BadInput(f"--to {to} is not available in this version") from None
        raise
    return module.write(results, Path(out), **options)


def written_counts(results: Results, min_score: float | None = None, most_doubtful: int | None = None,
                   doubt_first: bool = False) -> tuple[int, int]:
    """(images, boxes) that ``convert`` writes of ``results``: the decoded images (a task each for
    Label Studio) and their detections scoring at least ``min_score``."""
    from ._common import usable

    records = usable(in_review_order(results, most_doubtful, doubt_first), min_score)
    return len(records), sum(len(r.scores) for r in records)
