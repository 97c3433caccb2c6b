"""Base/novel category splits: which names a detector trains on and which it must find unseen."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import BadAnnotations

SPLIT_KEYS = ("base", "novel")


def load_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split file (YAML, or JSON by a ``.json`` suffix) with ``base:`` and ``novel:`` lists.

    Returns ``{"base": [...], "novel": [...]}``: category names in file order, duplicates
    dropped. Raises ``BadAnnotations`` for a missing or unparsable file, a missing or unknown
    key, a list holding anything but non-empty strings, or a name in both lists.
    """
    path = Path(path)
    if not path.is_file():
        raise BadAnnotations(
            f"{path}: split file not found; pass a YAML file with 'base:' and 'novel:' lists, "
            "e.g. configs/splits/shapes.yaml"
        )
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BadAnnotations(f"{path}: not a valid split file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise BadAnnotations(f"{path}: a split file must be a mapping with 'base' and 'novel' lists")
    unknown = sorted(set(data) - set(SPLIT_KEYS))
    if unknown:
        raise BadAnnotations(f"{path}: unknown key(s) {unknown}; a split file has only 'base' and 'novel'")
    split: dict[str, list[str]] = {}
    for key in SPLIT_KEYS:
        if key not in data:
            raise BadAnnotations(f"{path}: missing '{key}:' list (use '{key}: []' for none)")
        names = data[key] if data[key] is not None else []
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise BadAnnotations(f"{path}: '{key}' must be a list of category names (non-empty strings)")
        split[key] = list(dict.fromkeys(n.strip() for n in names))
    both = [n for n in split["base"] if n in set(split["novel"])]
    if both:
        raise BadAnnotations(f"{path}: {both} listed as both base and novel; a category belongs to one")
    return split
