"""RegionCLIP's released models (microsoft/RegionCLIP) without detectron2.

``files``: read a file (``weights_only=True``) and tell what it is (``detect_kind``).
``clip_tower``: the CLIP image + text towers -> open_clip ``RN50-quickgelu`` / ``RN50x4-quickgelu``.
``rpn``: detectron2 RPNs (R50-FPN, R50-C4) -> a torchvision Faster R-CNN proposal stage.
``concepts``: RegionCLIP's templates and its box predictor (concept files, its text ensemble,
scoring and box deltas are the core's: ``vocabulary``, ``text``, ``scoring``, ``box_head``).
``importer``: all of it into one regionclip checkpoint + preset YAML.

A leaf: the core never imports this package; ``regionclip import`` (``cli/importer.py``) does.
"""

from .clip_tower import build_clip, clip_model_name, convert_clip
from .concepts import (
    REGIONCLIP_TEMPLATES,
    RegionCLIPTextEncoder,
    box_predictor,
    check_concept_embeddings,
    concept_vocabulary,
    load_concept_embeddings,
)
from .files import KINDS, detect_kind, expect, read_file
from .importer import RECIPES, Imported, import_regionclip, preset_config, read_imported
from .rpn import (
    DETECTORS,
    Detectron2AnchorGenerator,
    Detectron2Transform,
    apply_detectron2_convention,
    build_rpn_detector,
    convert_rpn,
)

__all__ = [
    "KINDS", "detect_kind", "expect", "read_file",
    "convert_clip", "build_clip", "clip_model_name",
    "DETECTORS", "convert_rpn", "build_rpn_detector", "apply_detectron2_convention",
    "Detectron2AnchorGenerator", "Detectron2Transform",
    "REGIONCLIP_TEMPLATES", "load_concept_embeddings", "check_concept_embeddings", "concept_vocabulary",
    "RegionCLIPTextEncoder", "box_predictor",
    "RECIPES", "Imported", "import_regionclip", "preset_config", "read_imported",
]
