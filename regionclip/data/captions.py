"""COCO Captions files: the image-text pairs that caption-driven pretraining learns from.

A captions file (``captions_train.json``) sits beside its instances file and holds
``{"images": [...], "annotations": [{"id", "image_id", "caption"}, ...]}``; COCO gives about five
captions per image, ``regionclip make-shapes`` writes as many as ``--captions-per-image``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import BadAnnotations
from .coco import read_json


def load_captions(path: str | Path, image_ids: Iterable[int] | None = None) -> dict[int, list[str]]:
    """Read a COCO Captions JSON into ``{image_id: [caption, ...]}``.

    Captions keep the file's order per image, stripped of surrounding whitespace; blank ones are
    dropped (an image whose captions are all blank has none).

    Args:
        path: a COCO Captions JSON (``captions_*.json``).
        image_ids: the images that need captions (e.g. every image of a training set). When given,
            each must have at least one caption, and the result holds exactly these ids, in
            this order. ``None``: every image the file captions.

    Raises:
        BadAnnotations: the file is missing or not valid JSON; ``annotations`` is missing or an
            entry lacks ``image_id`` or ``caption``; an id of ``image_ids`` has no caption.
    """
    path = Path(path)
    data = read_json(path, "captions file not found; pass a COCO Captions captions_*.json (`regionclip "
                     "make-shapes DIR` writes captions_train.json and captions_val.json in DIR/annotations)",
                     "COCO Captions")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BadAnnotations(
            f"{path}: not a COCO Captions file: no 'annotations' list; expected a JSON object with "
            "'annotations': [{'image_id': ..., 'caption': ...}, ...]"
        )
    captions: dict[int, list[str]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise BadAnnotations(f"{path}: annotation {k} lacks 'image_id' or 'caption': {str(ann)[:120]}")
        image_id, caption = ann["image_id"], ann["caption"]
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(caption, str):
            raise BadAnnotations(
                f"{path}: annotation {k} needs an integer 'image_id' and a string 'caption', but got {str(ann)[:120]}"
            )
        if caption.strip():
            captions.setdefault(image_id, []).append(caption.strip())
    if image_ids is None:
        return captions
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    lacking = [i for i in ids if i not in captions]
    if lacking:
        raise BadAnnotations(
            f"{path}: {len(lacking)} of {len(ids)} images have no caption (first: image id {lacking[0]}); "
            "every training image needs at least one"
        )
    return {i: captions[i] for i in ids}


def captions_path_for(instances_path: str | Path) -> Path:
    """The captions file beside an instances file: ``.../instances_train.json`` -> ``.../captions_train.json``.

    Only the name changes; whether the file exists is ``load_captions``' concern.

    Raises:
        BadAnnotations: the file name does not start with ``instances_``.
    """
    path = Path(instances_path)
    prefix = "instances_"
    if not path.name.startswith(prefix):
        raise BadAnnotations(
            f"{path}: cannot tell its captions file: the name does not start with '{prefix}' "
            "(COCO's instances_<split>.json sits beside captions_<split>.json); name the captions file explicitly"
        )
    return path.with_name("captions_" + path.name[len(prefix):])
