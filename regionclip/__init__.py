"""regionclip: region-level open-vocabulary object detection.

The public names are imported on first use (PEP 562 ``__getattr__``), so ``import regionclip``,
``regionclip.errors`` and ``regionclip.config`` do not import torch; ``from regionclip import
RegionCLIP`` does, as it must. This keeps ``regionclip --help`` fast, and lets the import set
``OMP_WAIT_POLICY=PASSIVE`` (unless the environment has a value) before torch reads it.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# Set before torch loads OpenMP: spinning idle threads made everything 7-12x slower on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import (
    BadAnnotations,
    BadConfig,
    BadImage,
    BadInput,
    BadOutput,
    RegionClipError,
    UnknownModel,
    WeightsUnavailable,
)

# name -> module that defines it, imported when the name is first used
_LAZY = {
    "RegionCLIP": ".detector",
    "RegionCLIPModel": ".model",
    "Predictor": ".predictor",
    "Prediction": ".predictor",
    "Detections": ".detections",
    "ModelConfig": ".config",
    "score_regions": ".scoring",
    "ImageBatch": ".batch",
    "draw_detections": ".visualize",
    "save_annotated": ".visualize",
    "OnnxDetector": ".onnx",
    "export_onnx": ".onnx",
}

if TYPE_CHECKING:
    from .config import ModelConfig
    from .detections import Detections
    from .batch import ImageBatch
    from .detector import RegionCLIP
    from .model import RegionCLIPModel
    from .predictor import Prediction, Predictor
    from .onnx import OnnxDetector, export_onnx
    from .scoring import score_regions
    from .visualize import draw_detections, save_annotated

__all__ = [
    "RegionCLIP", "RegionCLIPModel", "Predictor", "Prediction", "Detections", "ModelConfig", "ImageBatch", "score_regions", "draw_detections",
    "save_annotated", "OnnxDetector", "export_onnx", "RegionClipError", "BadInput",
    "BadImage", "BadConfig", "BadAnnotations", "BadOutput", "UnknownModel", "WeightsUnavailable",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
