"""Label lists as the user gives them, checked once for every entry point. No torch here, so the
ONNX runtime (``regionclip.onnx.runtime``) shares it with ``RegionCLIP``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import BadInput


def check_labels(labels: str | Sequence[str]) -> list[str]:
    """A label or a sequence of labels -> a list of stripped names; ``BadInput`` when it is empty
    or one name is blank."""
    if isinstance(labels, str):
        labels = [labels]
    labels = [str(label).strip() for label in labels]
    if not labels or not all(labels):
        raise BadInput("labels must be a non-empty list of non-empty strings, e.g. [\"dog\", \"cat\"]")
    return labels


def read_label_lines(path: str | os.PathLike, what: str = "labels file") -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped (one label per line). ``BadInput``, one
    line naming the file, when it is missing or is not UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: the {what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                       f"{exc.start}); save it as UTF-8, one label per line") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
