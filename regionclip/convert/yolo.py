"""YOLO: a dataset folder ``data.yaml``, ``images/``, ``labels/*.txt`` (one ``class cx cy w h`` line
per box, normalised to [0, 1]), the layout Ultralytics and most YOLO trainers read.

Images are symlinked (``copy_images`` copies them) below ``images/`` in the layout they had below
their common folder; each has a label file at the same place below ``labels/`` (empty when
nothing was found: a negative example). ``data.yaml`` points both ``train`` and ``val`` at
``images``: split it before training on it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from ..atomic import atomic_path, atomic_write_text
from ..errors import BadInput
from ..records import Results
from ._common import clip_xyxy, names, output_folder, size_of, usable, vocabulary


def label_lines(boxes_xyxy, class_ids: list[int], width: int, height: int) -> list[str]:
    """``class cx cy w h`` per box, coordinates normalised by the image size (6 decimals: under a
    thousandth of a pixel on a 1000 px side)."""
    out = []
    for (x1, y1, x2, y2), c in zip(clip_xyxy(boxes_xyxy, width, height), class_ids):
        out.append(f"{c} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                   f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return out


def _place(source: Path, target: Path, copy: bool) -> None:
    if not source.is_file():
        raise BadInput(f"{source}: image not found; run convert where the run's image paths resolve")
    if target.is_symlink() or target.exists():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    else:
        os.symlink(os.path.abspath(source), target)


def write(results: Results, out: Path, *, min_score: float | None = None, copy_images: bool = False, **_) -> Path:
    """Write the dataset folder ``out``; returns ``out``."""
    records = usable(results, min_score)
    vocab = vocabulary(results, records)
    ids = {name: i for i, name in enumerate(vocab)}
    out = output_folder(Path(out))
    for r, name in zip(records, names(records)):
        w, h = size_of(r, "yolo")
        _place(Path(r.image), out / "images" / name, copy_images)
        lines = label_lines(r.boxes_xyxy, [ids[n] for n in r.labels], w, h)
        atomic_write_text((out / "labels" / name).with_suffix(".txt"), "".join(line + "\n" for line in lines))
    data = {"path": str(out.resolve()), "train": "images", "val": "images", "nc": len(vocab),
            "names": dict(enumerate(vocab))}
    atomic_write_text(out / "data.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return out
