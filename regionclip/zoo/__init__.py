"""RegionCLIP's released models (microsoft/RegionCLIP) without detectron2.

``files``: read a file (``weights_only=True``) and tell what it is (``detect_kind``).
``clip_tower``: the CLIP image + text towers -> open_clip ``RN50-quickgelu`` / ``RN50x4-quickgelu``.
``rpn``: detectron2 RPNs (R50-FPN, R50-C4) -> a torchvision Faster R-CNN proposal stage.
``concepts``: concept-embedding files, RegionCLIP's prompt ensemble (``RegionCLIPTextEncoder``),
scoring and box predictor.
``importer``: all of it into one regionclip checkpoint + preset YAML.
"""

from .clip_tower import build_clip, clip_model_name, convert_clip
from .concepts import (
    REGIONCLIP_TEMPLATES,
    RegionCLIPTextEncoder,
    box_predictor,
    check_concept_embeddings,
    concept_vocabulary,
    load_concept_embeddings,
    refine_boxes,
    regionclip_probabilities,
    regionclip_scores,
    regionclip_text_embeddings,
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
    "regionclip_text_embeddings", "RegionCLIPTextEncoder",
    "regionclip_probabilities", "regionclip_scores", "box_predictor", "refine_boxes",
    "RECIPES", "Imported", "import_regionclip", "preset_config", "read_imported",
]
