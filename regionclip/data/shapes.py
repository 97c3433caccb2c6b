"""Synthetic "coloured shapes" detection data set in COCO format, fully determined by a seed.

Twelve categories, ``"<colour> <shape>"`` for colours red, green, blue, yellow and shapes circle,
square, triangle, with COCO ids 1..12 in that (colour-major) order. Three of them form the
novel split, so a base-trained detector can be tested on names it never saw boxes for; the
novel names recombine a colour and a shape that the base split does contain separately.

Each image also gets captions (COCO Captions format) for caption-driven pretraining: several
phrasings that name every shape in it, novel ones included ("two red circles and a blue
triangle on a grey background"), since a caption is what tells a region learner about the
names its boxes never show. An empty image is captioned without any category name.

Every image draws from its own ``numpy.random.Generator`` seeded with ``(seed, split, index)``,
so image ``i`` is the same whatever ``n_train``/``n_val`` are, and the same seed gives
byte-identical JSON and identical pixels. Its captions draw from a second generator,
``(seed, split, index, 1)``: pixels and boxes are the same with or without captions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import yaml

from ..errors import BadInput, BadOutput
from ..outputs import atomic_write_text, check_output_dir
from .shape_captions import background_word, shape_captions  # noqa: F401 (shape_captions re-exported)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 215, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CATEGORIES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
NOVEL: list[str] = ["red triangle", "green circle", "blue square"]
BASE: list[str] = [name for name in CATEGORIES if name not in NOVEL]

# Clutter uses colours that are not target colours, so it never looks like an unlabelled object.
CLUTTER_COLOURS: list[tuple[int, int, int]] = [
    (128, 128, 128), (60, 60, 60), (200, 200, 200),  # greys
    (120, 75, 35), (150, 100, 60),  # browns
    (120, 50, 140), (170, 110, 190),  # purples
]

# "Others": objects that are none of the categories (``make_shapes(others=N)``), annotated under
# OTHER_NAME so training can learn "none of these" (``data.negative_categories``). Their colours
# and shapes are neither the default world's nor the alt world's, so alt stays a world training
# never saw: hues at least 15 degrees from all eight named colours, shapes unlike star, hexagon
# and cross. A third are other shapes in target colours, a third target shapes in other colours,
# a third both other.
OTHER_NAME = "other"
OTHER_COLOURS: tuple[tuple[int, int, int], ...] = (
    (150, 225, 40),  # lime, hue ~85
    (30, 165, 140),  # teal, hue ~172
    (40, 150, 235),  # azure, hue ~206
    (100, 55, 225),  # violet, hue ~256
    (215, 40, 205),  # magenta, hue ~303
)
OTHER_SHAPES: tuple[str, ...] = ("ellipse", "diamond", "ring", "half-disc")

MIN_SHAPE_PX = 16  # smallest object side; below this a colour/shape call is guesswork
MAX_SHAPE_FRAC = 0.4  # largest object side as a fraction of the image's shorter side
MAX_PAIR_IOU = 0.1  # shapes may touch and overlap slightly, never hide each other
COLOUR_JITTER = 20  # per-channel +- around the nominal colour
EMPTY_PROB = 0.05  # share of images with no objects (detectors must learn to say nothing)


@dataclass(frozen=True)
class Style:
    """One generated world: what objects look like, how many, and how busy the background is.

    A style other than the default is a held-out check: a method chosen on ``shapes`` is
    reported on a world it was never tuned on (other shapes, colours, sizes, clutter and share
    of novel objects). Category names are ``"<colour> <shape>"`` in colour-major order.
    """

    colours: dict[str, tuple[int, int, int]]
    shapes: tuple[str, ...]
    novel: tuple[str, ...]
    clutter_colours: tuple[tuple[int, int, int], ...]  # never a target colour
    min_px: int = MIN_SHAPE_PX
    max_frac: float = MAX_SHAPE_FRAC
    max_px: int | None = None  # a cap on the object side in pixels whatever the image size (small objects)
    max_objects: int = 6
    clutter_lines: int = 7  # at most this many minus one thin lines ...
    clutter_blobs: int = 9  # ... and small blobs
    # Chance that an object is drawn from the novel categories; None: every category alike
    # (3 of 12 novel). Training images keep novel objects unlabelled (data.use_base_only), so
    # this is the share of unlabelled objects a proposal stage sees in training.
    novel_prob: float | None = None

    @property
    def categories(self) -> list[str]:
        return [f"{c} {s}" for c in self.colours for s in self.shapes]

    @property
    def base(self) -> list[str]:
        return [name for name in self.categories if name not in self.novel]


STYLES: dict[str, Style] = {
    "shapes": Style(dict(COLOURS), SHAPES, tuple(NOVEL), tuple(CLUTTER_COLOURS)),
    # The held-out world: no shape and no colour of the default one, smaller and larger objects,
    # more of them, busier clutter, and twice the default share of novel (unlabelled) objects.
    "alt": Style(
        colours={"orange": (245, 135, 20), "purple": (125, 45, 200), "cyan": (25, 200, 215), "pink": (250, 125, 190)},
        shapes=("star", "hexagon", "cross"),
        novel=("orange star", "purple hexagon", "cyan cross"),
        clutter_colours=((128, 128, 128), (60, 60, 60), (200, 200, 200), (110, 120, 60), (90, 70, 50)),
        min_px=12, max_frac=0.5, max_objects=8, clutter_lines=10, clutter_blobs=14, novel_prob=0.5,
    ),
}

_SPLIT_CODES = {"train": 0, "val": 1}



def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted solid, gradient or noise background, HxWx3 uint8 RGB."""

    def muted() -> np.ndarray:
        # Low saturation so backgrounds never read as one of the four target colours.
        return float(rng.uniform(50, 210)) + rng.uniform(-25, 25, size=3)

    kind = int(rng.integers(3))
    if kind == 0:
        img = np.broadcast_to(muted(), (h, w, 3)).astype(np.float32)
    elif kind == 1:
        a, b = muted(), muted()
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    else:
        noise = rng.normal(0, rng.uniform(8, 25), size=(h, w, 3)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), float(rng.uniform(0.5, 3.0)))
        img = muted()[None, None] + noise
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))


def _clutter(rng: np.random.Generator, img: np.ndarray, style: Style) -> None:
    """Thin lines and small blobs in non-target colours, drawn in place."""
    h, w = img.shape[:2]
    palette = style.clutter_colours
    for _ in range(int(rng.integers(0, style.clutter_lines))):
        colour = palette[int(rng.integers(len(palette)))]
        p1 = (int(rng.integers(w)), int(rng.integers(h)))
        p2 = (int(rng.integers(w)), int(rng.integers(h)))
        cv2.line(img, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, style.clutter_blobs))):
        colour = palette[int(rng.integers(len(palette)))]
        centre = (int(rng.integers(w)), int(rng.integers(h)))
        axes = (int(rng.integers(2, 7)), int(rng.integers(2, 7)))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)


def _shape_mask(rng: np.random.Generator, shape: str, h: int, w: int, side: int) -> tuple[np.ndarray, int, int]:
    """``(mask, x0, y0)``: an anti-aliased uint8 mask (0..255) of one shape whose extent is about
    ``side`` px, drawn in the window of an HxW image whose top-left is (x0, y0). A window, not the
    whole image: in a 2048 px image of 60 small shapes, whole-image masks took most of the time.
    Shifted by whole pixels, the drawing is the one the whole image would get."""
    r = side / 2.0
    cx = float(rng.uniform(r + 1, w - r - 1))
    cy = float(rng.uniform(r + 1, h - r - 1))
    pad = int(r) + 4  # anti-aliasing spills a pixel past the shape
    x0, y0 = max(0, round(cx) - pad), max(0, round(cy) - pad)
    mask = np.zeros((min(h, round(cy) + pad + 1) - y0, min(w, round(cx) + pad + 1) - x0), np.uint8)
    if shape in ("circle", "ring"):
        cv2.circle(mask, (round(cx) - x0, round(cy) - y0), max(int(r), 1), 255, -1, cv2.LINE_AA)
        if shape == "ring":  # the hole shows the background: an outline, not a disc
            cv2.circle(mask, (round(cx) - x0, round(cy) - y0), max(int(r * 0.55), 1), 0, -1, cv2.LINE_AA)
        return mask, x0, y0
    if shape == "square":
        # A small tilt only: at 45 degrees a square becomes a diamond, which is a different name.
        tilt = np.deg2rad(rng.uniform(-15, 15))
        edge = side / (np.cos(tilt) + abs(np.sin(tilt)))  # the tilted square's extent stays ``side``
        offsets = [tilt + np.pi / 4 + k * np.pi / 2 for k in range(4)]
        radius = edge / np.sqrt(2)
    elif shape == "triangle":
        angle = rng.uniform(0, 2 * np.pi)
        offsets = [angle + k * 2 * np.pi / 3 for k in range(3)]
        radius = r
    else:
        offsets, radius = _outline(rng, shape, r)
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(offsets),))
    pts = np.array([[cx + q * np.cos(a), cy + q * np.sin(a)] for a, q in zip(offsets, radii)])
    # Sub-pixel vertices (4 fractional bits) keep small shapes from snapping to a coarse grid.
    fixed = np.round(pts * 16).astype(np.int32) - np.array([x0 * 16, y0 * 16], np.int32)
    cv2.fillPoly(mask, [fixed], 255, cv2.LINE_AA, shift=4)
    return mask, x0, y0


def _outline(rng: np.random.Generator, shape: str, r: float) -> tuple[list[float], np.ndarray]:
    """Polar vertices ``(angles, radii)`` of the held-out style's shapes, extent about ``2 r``."""
    angle = rng.uniform(0, 2 * np.pi)
    if shape == "hexagon":
        return [angle + k * np.pi / 3 for k in range(6)], np.full(6, r)
    if shape == "star":  # five points, inner radius 0.45: unmistakably not a hexagon or a cross
        return [angle + k * np.pi / 5 for k in range(10)], np.array([r, 0.45 * r] * 5)
    if shape == "cross":  # a plus sign whose arms are a third of its extent wide
        half = np.arctan2(1.0, 3.0)  # the arm's corner seen from the centre: (r/3, r)
        inner = np.hypot(1.0, 1.0) * r / 3
        angles, radii = [], []
        for k in range(4):
            a = angle + k * np.pi / 2
            angles += [a - half, a + half, a + np.pi / 4]
            radii += [np.hypot(1.0, 3.0) * r / 3, np.hypot(1.0, 3.0) * r / 3, inner]
        return angles, np.array(radii)
    if shape == "ellipse":  # axes 1 : 0.5, turned at random
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        radii = r * 0.5 / np.sqrt((0.5 * np.cos(t)) ** 2 + np.sin(t) ** 2)
        return list(angle + t), radii
    if shape == "diamond":  # a rhombus with diagonals 1 : 0.6: never a tilted square
        return [angle + k * np.pi / 2 for k in range(4)], np.array([r, 0.6 * r] * 2)
    if shape == "half-disc":
        return list(angle + np.linspace(0, np.pi, 17)), np.full(17, r)
    raise BadInput(f"unknown shape {shape!r}")


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_shapes_image(
    rng: np.random.Generator,
    size: int | tuple[int, int] = (384, 384),
    max_objects: int | None = None,
    empty_prob: float = EMPTY_PROB,
    style: Style | str = "shapes",
    others: int = 0,
) -> tuple[np.ndarray, list[tuple[tuple[int, int, int, int], str]]]:
    """Draw one image of coloured shapes on a cluttered background.

    Args:
        rng: the generator all randomness comes from (the image is a function of its state).
        size: ``(height, width)`` in pixels, or one int for a square image; each side >= 64.
        max_objects: at most this many shapes (fewer when placement would overlap too much);
            None: the style's.
        empty_prob: chance of an image with no shapes at all.
        style: a ``Style`` or a name in ``STYLES``: what the objects and background look like.
        others: up to this many more objects (0 to ``others``, drawn after the rest, so the
            image's other objects and boxes do not change) that are none of the categories
            (``OTHER_COLOURS``, ``OTHER_SHAPES``), named ``OTHER_NAME``.

    Returns:
        ``(rgb, objects)``: ``rgb`` is an HxWx3 uint8 RGB array; ``objects`` lists
        ``(box_xyxy, name)`` with integer pixel boxes ``x1, y1, x2, y2`` (x2/y2 exclusive: the
        tight box of the shape's pixels) and ``name`` one of the style's categories. Boxes are amodal:
        a later shape may cover a sliver of an earlier one.
    """
    style = get_style(style)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(h, w) < 64:
        raise BadInput(f"image size must be at least 64 px a side, but got {h}x{w}")
    max_objects = style.max_objects if max_objects is None else max_objects
    img = _background(rng, h, w)
    _clutter(rng, img, style)
    objects: list[tuple[tuple[int, int, int, int], str]] = []
    n = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    max_side = max(style.min_px + 1, int(style.max_frac * min(h, w)))
    if style.max_px is not None:
        max_side = max(style.min_px + 1, min(max_side, style.max_px))
    for _ in range(n):
        placed = _place(rng, style, objects, h, w, max_side, lambda: _draw_category(rng, style))
        if placed is not None:
            box, mask, x0, y0, (colour, shape) = placed
            _paint(rng, img, mask, x0, y0, style.colours[colour])
            objects.append((box, f"{colour} {shape}"))
    for _ in range(int(rng.integers(0, others + 1)) if others else 0):
        placed = _place(rng, style, objects, h, w, max_side, lambda: _draw_other(rng, style))
        if placed is not None:
            box, mask, x0, y0, (rgb, _shape) = placed
            _paint(rng, img, mask, x0, y0, rgb)
            objects.append((box, OTHER_NAME))
    return img, objects


def _place(rng, style: Style, objects, h: int, w: int, max_side: int, draw):
    """``(box, mask, x0, y0, what)`` for the next object, ``what = draw()`` (its colour and
    shape), placed where it overlaps no earlier object by more than ``MAX_PAIR_IOU``; None when
    30 tries found no room (fewer objects is fine)."""
    for _attempt in range(30):
        # Log-uniform sizes: as many small objects as large ones, as in real detection data.
        side = int(np.exp(rng.uniform(np.log(style.min_px), np.log(max_side))))
        what = draw()
        mask, x0, y0 = _shape_mask(rng, what[1], h, w, side)
        ys, xs = np.nonzero(mask >= 128)
        if len(xs) == 0:
            continue
        box = (int(xs.min()) + x0, int(ys.min()) + y0, int(xs.max()) + 1 + x0, int(ys.max()) + 1 + y0)
        if all(_iou(box, other) <= MAX_PAIR_IOU for other, _ in objects):
            return box, mask, x0, y0, what
    return None


def _paint(rng, img: np.ndarray, mask: np.ndarray, x0: int, y0: int, colour) -> None:
    """Blend ``colour`` (jittered per channel) into ``img`` through ``mask``, in place."""
    rgb = np.clip(np.array(colour) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
    alpha = mask.astype(np.float32)[..., None] / 255.0
    part = img[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]  # outside the mask the blend is the identity
    part[...] = (part * (1 - alpha) + rgb[None, None].astype(np.float32) * alpha + 0.5).astype(np.uint8)


def _draw_other(rng: np.random.Generator, style: Style) -> tuple[tuple[int, int, int], str]:
    """``(rgb, shape)`` of an object that is none of ``style``'s categories."""
    kind = int(rng.integers(3))  # 0: other shape, target colour; 1: target shape, other colour; 2: both other
    shape = style.shapes[int(rng.integers(len(style.shapes)))] if kind == 1 else \
        OTHER_SHAPES[int(rng.integers(len(OTHER_SHAPES)))]
    palette = list(style.colours.values()) if kind == 0 else list(OTHER_COLOURS)
    return tuple(palette[int(rng.integers(len(palette)))]), shape


def get_style(style: Style | str) -> Style:
    """A ``Style`` as given, or the one named in ``STYLES``."""
    if isinstance(style, Style):
        return style
    if style not in STYLES:
        raise BadInput(f"unknown shapes style {style!r}: use one of {', '.join(STYLES)}")
    return STYLES[style]


def _draw_category(rng: np.random.Generator, style: Style) -> tuple[str, str]:
    """``(colour, shape)`` of the next object."""
    if style.novel_prob is None:  # the default world's draw order, so its images never change
        shape = style.shapes[int(rng.integers(len(style.shapes)))]
        colour = list(style.colours)[int(rng.integers(len(style.colours)))]
        return colour, shape
    pool = list(style.novel) if rng.random() < style.novel_prob else style.base
    colour, shape = pool[int(rng.integers(len(pool)))].split(" ", 1)
    return colour, shape


def split_dict(style: Style | str = "shapes") -> dict[str, list[str]]:
    """The style's base/novel split, as written to ``split.yaml``."""
    style = get_style(style)
    return {"base": style.base, "novel": list(style.novel)}


def make_shapes(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 300,
    seed: int = 0,
    image_size: tuple[int, int] = (256, 512),
    progress: Callable[[int], None] | None = None,
    captions_per_image: int = 5,
    style: Style | str = "shapes",
    overwrite: bool = False,
    object_size: tuple[int, int] | None = None,
    max_objects: int | None = None,
    others: int = 0,
) -> dict[str, Path]:
    """Write the shapes data set: JPEGs, COCO annotations, captions and the base/novel split.

    Layout under ``out_dir``: ``train/*.jpg``, ``val/*.jpg``, ``annotations/instances_train.json``,
    ``annotations/instances_val.json``, ``annotations/captions_train.json``,
    ``annotations/captions_val.json``, ``split.yaml``. COCO ``file_name`` is relative to the
    split's image folder. Boxes are ``xywh`` in pixels; ``area`` is the box area. The captions
    files are COCO Captions: the instances file's ``images`` and ``annotations`` of
    ``{"id", "image_id", "caption"}``; every caption names every shape of its image, novel
    ones included (see ``shape_captions``).

    Args:
        image_size: ``(min, max)`` side in pixels; height and width are drawn independently.
        progress: called with the number of images written so far after each image.
        captions_per_image: phrasings per image; 0 writes no captions files. Images and
            instances files are the same whatever this is.
        style: the world drawn (``STYLES``): ``shapes`` (the default, 12 classes) or ``alt``
            (other shapes, colours, sizes and clutter; a held-out check).
        overwrite: write into ``out_dir`` even when it holds files (they are written over, none
            are removed); without it a non-empty ``out_dir`` is refused.
        object_size: ``(min, max)`` object side in pixels, replacing the style's (whose largest
            is a share of the image): ``(12, 40)`` with 2048 px images gives the small objects in
            large images that tiled detection is for. None: the style's.
        max_objects: at most this many objects per image (each image draws 1 to this many);
            None: the style's.
        others: up to this many objects per image that are none of the categories (other
            shapes and colours: ``render_shapes_image``), annotated as category ``OTHER_NAME``
            (id 13 on the default world) and never captioned: hard negatives for
            ``data.negative_categories``. Every other object, box and caption is the same as
            without them. 0 (the default): none, and no such category.

    Returns:
        Paths keyed ``train_images``, ``val_images``, ``train_annotations``,
        ``val_annotations``, ``split``, and (unless ``captions_per_image`` is 0)
        ``train_captions``, ``val_captions``.

    Raises:
        BadInput: counts or sizes out of range. BadOutput: ``out_dir`` cannot be written, or
            is not empty without ``overwrite``; found before anything is drawn.
    """
    lo, hi = int(image_size[0]), int(image_size[1])
    style_name = style if isinstance(style, str) else "custom"
    style = get_style(style)
    default_world = style is STYLES["shapes"]
    if object_size is not None:
        small, large = (int(v) for v in object_size)
        if small < 4 or large < small:
            raise BadInput(f"object_size must be (min, max) pixels with 4 <= min <= max, but got {tuple(object_size)}")
        style = dataclasses.replace(style, min_px=small, max_px=large)
    if max_objects is not None:
        if int(max_objects) < 1:
            raise BadInput(f"max_objects must be at least 1, but got {max_objects}")
        style = dataclasses.replace(style, max_objects=int(max_objects))
    if others < 0:
        raise BadInput(f"others must be >= 0, but got {others}")
    categories = style.categories + ([OTHER_NAME] if others else [])
    if n_train < 0 or n_val < 0:
        raise BadInput(f"image counts must be >= 0, but got train={n_train} val={n_val}")
    if lo < 64 or hi < lo:
        raise BadInput(f"image_size must be (min, max) with 64 <= min <= max, but got {image_size}")
    if captions_per_image < 0:
        raise BadInput(f"captions_per_image must be >= 0 (0 writes no captions), but got {captions_per_image}")
    out = check_output_dir(out_dir, "shapes output folder")  # before any image is drawn
    # Another set's images and annotations mixed with these would train on a set nobody made.
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise BadOutput(f"shapes output folder {out} is not empty: give a new or empty folder, "
                        "or pass --overwrite to write over it")
    paths = {
        "train_images": out / "train",
        "val_images": out / "val",
        "train_annotations": out / "annotations" / "instances_train.json",
        "val_annotations": out / "annotations" / "instances_val.json",
        "split": out / "split.yaml",
    }
    if captions_per_image:
        paths["train_captions"] = out / "annotations" / "captions_train.json"
        paths["val_captions"] = out / "annotations" / "captions_val.json"
    try:
        for key in ("train_images", "val_images"):
            paths[key].mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadOutput(f"cannot create folders in {out} ({exc.strerror or exc})") from None

    written = 0
    for split, count in (("train", n_train), ("val", n_val)):
        images, annotations, captions = [], [], []
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
            h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            img, objects = render_shapes_image(rng, (h, w), style=style, others=others)
            file_name = f"{i:06d}.jpg"
            target = paths[f"{split}_images"] / file_name
            if not cv2.imwrite(str(target), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise BadOutput(f"could not write {target}: check that {out} is writable and has space")
            image_id = i + 1
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
            for (x1, y1, x2, y2), name in objects:
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories.index(name) + 1,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float((x2 - x1) * (y2 - y1)),
                    "iscrowd": 0,
                })
            if captions_per_image:
                # A generator of its own, not the image's: the image's stream stays what rendering
                # alone draws, so pixels and boxes cannot depend on the caption count or templates.
                caption_rng = np.random.default_rng([seed, _SPLIT_CODES[split], i, 1])
                texts = shape_captions([name for _, name in objects if name != OTHER_NAME], caption_rng, captions_per_image,
                                       background_word(img))
                for text in texts:
                    captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
            written += 1
            if progress is not None:
                progress(written)
        coco = {
            "info": {"description": f"regionclip synthetic shapes ({split})", "seed": seed,
                     **({"style": style_name} if not default_world else {}),
                     **({"object_size": [style.min_px, style.max_px]} if object_size is not None else {}),
                     **({"max_objects": style.max_objects} if max_objects is not None else {}),
                     **({"others": others} if others else {})},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(categories)],
        }
        atomic_write_text(paths[f"{split}_annotations"], json.dumps(coco, indent=1) + "\n")
        if captions_per_image:
            captions_file = {
                "info": {"description": f"regionclip synthetic shapes captions ({split})", "seed": seed},
                "images": images,
                "annotations": captions,
            }
            atomic_write_text(paths[f"{split}_captions"], json.dumps(captions_file, indent=1) + "\n")
    atomic_write_text(paths["split"], yaml.safe_dump(split_dict(style), sort_keys=False))
    return paths
