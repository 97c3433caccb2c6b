"""CVAT: a COCO 1.0 archive (``annotations/instances_default.json`` in a zip), what CVAT's
"Upload annotations" with format "COCO 1.0" reads into a task whose images are those of the run.

The instances are ``coco.instances_file``'s (one writer, one set of rules: ids from 1, boxes
clipped to the image, images named relative to their common folder, as CVAT names a task's files
uploaded from there), each annotation with CVAT's ``attributes``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..atomic import atomic_path
from ..errors import BadOutput
from ..records import Results
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
