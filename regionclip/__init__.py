"""regionclip: region-level open-vocabulary object detection."""

from .config import ModelConfig
from .detections import Detections
from .detector import RegionCLIP, score_regions
from .errors import (
    BadAnnotations,
    BadConfig,
    BadImage,
    BadInput,
    RegionClipError,
    UnknownModel,
    WeightsUnavailable,
)

__all__ = [
    "RegionCLIP", "Detections", "ModelConfig", "score_regions", "RegionClipError", "BadInput",
    "BadImage", "BadConfig", "BadAnnotations", "UnknownModel", "WeightsUnavailable",
]
__version__ = "0.1.0"
