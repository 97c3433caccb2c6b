"""ONNX export of a ``RegionCLIP`` model and a detector that runs it with onnxruntime, without torch.

``export_onnx(model, DIR)`` (``regionclip export``) writes four graphs (five for ``proposals.source=refined``) and a manifest; labels are
an input of the scoring graph, so a new vocabulary never needs a new export.
``OnnxDetector(DIR)`` runs them: ``predict`` takes and returns numpy arrays and never imports
torch. It is the ONNX backend of ``regionclip.predictor.Predictor``: ``RegionCLIP.from_onnx(DIR)``
(and ``regionclip detect --model DIR``) is a ``Predictor`` over it, with ``detect`` and
``stream`` as for the torch model (paths, PIL images, arrays; ``Detections``).

Nothing here imports torch or onnxruntime at import time. onnx and onnxruntime come with the
optional extra: ``pip install -e ".[onnx]"``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import RegionClipError

_EXTRA_HINT = 'pip install -e ".[onnx]" (or pip install onnx onnxruntime)'


class OnnxUnavailable(RegionClipError):
    """onnx or onnxruntime, which export and the ONNX runtime need, is not installed."""

    exit_code = 2


def require(module: str) -> Any:
    """Import ``module`` (onnx, onnxruntime), or raise ``OnnxUnavailable`` with the install line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxUnavailable(f"{module} is not installed, and ONNX export and inference need it: "
                              f"{_EXTRA_HINT}") from None


_LAZY = {
    "OnnxDetector": ".runtime",
    "export_onnx": ".export",
    "is_export_dir": ".manifest",
    "read_manifest": ".manifest",
}

__all__ = ["OnnxDetector", "OnnxUnavailable", "export_onnx", "is_export_dir", "read_manifest", "require"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
