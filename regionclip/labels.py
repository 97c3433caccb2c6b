"""Label lists as the user gives them, checked once for every entry point. No torch here, so the
ONNX runtime (``regionclip.onnx.runtime``) shares it with ``RegionCLIP``."""

from __future__ import annotations

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
