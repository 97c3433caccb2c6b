"""CVAT: a COCO 1.0 archive (``annotations/instances_default.json`` in a zip), what CVAT's
"Upload annotations" with format "COCO 1.0" reads into a task whose images are those of the run.

The instances are ``coco.instances_file``'s (one writer, one set of rules: ids from 1, boxes
clipped to the image, images named relative to their common folder, as CVAT names a task's files
uploaded from there), each annotation with CVAT's ``attributes``.

``read`` takes the corrections back: CVAT's "Export dataset" / "Export annotations" in format
COCO 1.0, a zip with ``annotations/instances_<subset>.json`` (``instances_default.json`` for a
task; every subset of a project, in name order) and, with images, ``images/``. Each annotation's
``bbox`` is its box (a polygon's too); images keep the ``file_name`` CVAT gave them.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..atomic import atomic_path
from ..errors import BadInput, BadOutput
from ..records import ImageRecord, Results
from ._common import annotated, person_record
from .coco import instances_file

MEMBER = "annotations/instances_default.json"


def instances(results: Results, min_score: float | None = None) -> dict:
    """The COCO instances dict (``coco.instances_file``'s), each annotation with CVAT's attributes."""
    coco = instances_file(results, min_score, fmt="cvat")
    for a in coco["annotations"]:
        a["attributes"] = {"occluded": False}
    return coco


def write(results: Results, out: Path, *, min_score: float | None = None, **_) -> Path:
    """Write the archive at ``out`` (a ``.zip`` file); returns ``out``."""
    out = Path(out)
    if out.is_dir():
        raise BadOutput(f"{out} is a folder; cvat writes one archive: pass a file such as {out / 'cvat.zip'}")
    data = json.dumps(instances(results, min_score))
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MEMBER, data)
    return out


def _instances(path: Path) -> list[tuple[str, dict]]:
    """(member name, its COCO dict) of every ``annotations/instances_*.json`` in the zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist()
                           if n.startswith("annotations/instances_") and n.endswith(".json"))
            if not names:
                raise BadInput(f"{path}: no annotations/instances_*.json in the zip; export the task or project "
                               "from CVAT in format COCO 1.0")
            return [(n, json.loads(zf.read(n))) for n in names]
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not a readable CVAT COCO 1.0 zip ({type(exc).__name__})") from None


def read(path: Path, *, images_dir: str | None = None, **_) -> Results:
    """People's boxes in a CVAT COCO 1.0 zip at ``path`` (rules above) as ``Results``; with
    ``images_dir`` each image is that folder / its ``file_name``, so the files can be found."""
    labels: list[str] = []
    images: list[ImageRecord] = []
    for member, coco in _instances(path):
        try:
            names = {c["id"]: str(c["name"]) for c in sorted(coco["categories"], key=lambda c: c["id"])}
            labels += list(names.values())
            boxes: dict = {im["id"]: ([], []) for im in coco["images"]}
            for a in coco["annotations"]:
                x, y, w, h = (float(v) for v in a["bbox"])
                boxes[a["image_id"]][0].append([x, y, x + w, y + h])
                boxes[a["image_id"]][1].append(names[a["category_id"]])
            for im in coco["images"]:
                name = str(Path(images_dir) / im["file_name"]) if images_dir else str(im["file_name"])
                size = (int(im["width"]), int(im["height"])) if im.get("width") and im.get("height") else None
                images.append(person_record(name, size, *boxes[im["id"]]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"{path}: {member} is not a COCO instances file (images, categories, annotations with "
                           f"bbox, image_id and category_id): {type(exc).__name__} {exc}") from None
    return annotated(images, labels, path, "cvat")
