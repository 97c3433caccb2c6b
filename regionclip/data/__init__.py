"""Data: the synthetic shapes set, COCO detection datasets, captions and base/novel splits."""

from .captions import captions_path_for, load_captions
from .coco import CocoDetection, collate, to_float
from .shapes import CATEGORIES as SHAPES_CATEGORIES
from .shapes import make_shapes, render_shapes_image
from .splits import load_split

__all__ = [
    "CocoDetection", "collate", "to_float", "captions_path_for", "load_captions", "load_split", "make_shapes",
    "render_shapes_image", "SHAPES_CATEGORIES",
]
