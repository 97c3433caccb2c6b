"""YOLO: a dataset folder ``data.yaml``, ``images/``, ``labels/*.txt`` (one ``class cx cy w h`` line
per box, normalised to [0, 1]), the layout Ultralytics and most YOLO trainers read.

Images are symlinked (``copy_images`` copies them) below ``images/`` in the layout they had below
their common folder; each has a label file at the same place below ``labels/`` (empty when
nothing was found: a negative example). ``data.yaml`` points both ``train`` and ``val`` at
``images``: split it before training on it.

``read`` takes a YOLO dataset back (one that people corrected, or any in this layout): the images of
``data.yaml``'s ``train``, ``val`` and ``test`` (a folder, a ``.txt`` list of images or a list of
either, relative to ``path``, else to the yaml's folder), each once, with the label file at the
image's path with its last ``images`` folder renamed ``labels`` and a ``.txt`` suffix (the
Ultralytics rule). A missing label file is an image without boxes; a line with more than five
numbers is a polygon, read as the box around it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from ..atomic import atomic_path, atomic_write_text
from ..errors import BadInput
from ..io import IMAGE_EXTENSIONS
from ..records import ImageRecord, Results
from ._common import annotated, clip_xyxy, names, output_folder, person_record, size_of, usable, vocabulary


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


def _yaml(path: Path) -> tuple[Path, dict]:
    """(the yaml file, its content) for a dataset folder or its yaml."""
    file = path / "data.yaml" if path.is_dir() else path
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BadInput(f"{file}: not a readable YOLO data.yaml ({type(exc).__name__})") from None
    if not isinstance(data, dict) or "names" not in data or not any(k in data for k in ("train", "val", "test")):
        raise BadInput(f"{file}: a YOLO data.yaml needs names and train/val/test image folders")
    return file, data


def _split_images(entry, root: Path) -> list[Path]:
    """The images of one split entry: a folder (searched below), a .txt list, or a list of either."""
    out: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        where = Path(str(item))
        where = where if where.is_absolute() else root / where
        if where.is_dir():
            out += sorted(p for p in where.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif where.is_file() and where.suffix == ".txt":
            lines = [s.strip() for s in where.read_text().splitlines() if s.strip()]
            out += [Path(s) if Path(s).is_absolute() else where.parent / s for s in lines]
        else:
            raise BadInput(f"{where}: a split of the YOLO dataset that is not there (data.yaml names it)")
    return out


def label_file(image: Path) -> Path:
    """Where a YOLO trainer looks for ``image``'s labels: its last ``images`` folder as ``labels``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read(path: Path, **_) -> Results:
    """People's boxes in the YOLO dataset at ``path`` (a folder with ``data.yaml``, or the yaml)."""
    file, data = _yaml(Path(path))
    base = Path(str(data.get("path") or "."))
    root = base if base.is_absolute() else file.parent / base
    names = data["names"]
    classes = {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
    seen: set[Path] = set()
    images: list[ImageRecord] = []
    for split in ("train", "val", "test"):
        for image in _split_images(data[split], root) if data.get(split) else []:
            key = image.resolve()
            if key in seen:
                continue
            seen.add(key)
            images.append(_record(image, classes))
    return annotated(images, [classes[k] for k in sorted(classes)], file, "yolo")


def _record(image: Path, classes: dict[int, str]) -> ImageRecord:
    record = person_record(str(image), None, [], [])
    if record.width is None:
        raise BadInput(f"{image}: image not found or unreadable; YOLO labels are relative to the image size")
    w, h = record.width, record.height
    labels_at = label_file(image)
    boxes, labels = [], []
    lines = labels_at.read_text().splitlines() if labels_at.is_file() else []
    for n, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            c, values = int(fields[0]), [float(v) for v in fields[1:]]
            name = classes[c]
        except (ValueError, KeyError):
            raise BadInput(f"{labels_at}:{n}: not 'class cx cy w h' with a class of data.yaml's names") from None
        if len(values) == 4:
            cx, cy, bw, bh = values
            box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        else:
            raise BadInput(f"{labels_at}:{n}: expected 'class cx cy w h' (or a polygon's x y pairs)")
        boxes.append([box[0] * w, box[1] * h, box[2] * w, box[3] * h])
        labels.append(name)
    return person_record(str(image), (w, h), boxes, labels)
