"""Data: the synthetic shapes set, COCO detection datasets and base/novel splits."""

from .coco import CocoDetection, collate
from .shapes import CATEGORIES as SHAPES_CATEGORIES
from .shapes import make_shapes, render_shapes_image
from .splits import load_split

__all__ = ["CocoDetection", "collate", "load_split", "make_shapes", "render_shapes_image", "SHAPES_CATEGORIES"]
