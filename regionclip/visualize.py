"""Draw ``Detections`` on images: thin boxes and readable "label score" tags that stay inside and apart.

``draw_detections`` returns an annotated copy, ``save_annotated`` also writes it (atomically), and
``layout_tags`` is the pure placement rule both use, so it can be tested without reading pixels.
"""

from __future__ import annotations

import colorsys
import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .detections import Detections
from .errors import BadOutput
from .io import ImageSource, load_image
from .outputs import WRITABLE_IMAGE_EXTENSIONS, atomic_write_bytes, check_output_file

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive

JPEG_QUALITY = 95


def _colour(label_id: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps keep neighbouring label ids far apart in colour.
    r, g, b = colorsys.hsv_to_rgb((label_id * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _ink(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``fill`` (WCAG relative luminance)."""
    lin = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in fill]
    luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    # Contrast with black is (L + 0.05) / 0.05, with white 1.05 / (L + 0.05); equal at L ~ 0.179.
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


def default_sizes(image_size: tuple[int, int]) -> tuple[int, int]:
    """``(font_px, line_px)`` for an image of ``(height, width)``: 12 px text at least, 1 px boxes up to ~750 px."""
    mean_side = (image_size[0] + image_size[1]) / 2
    return max(12, round(0.025 * mean_side)), max(1, round(mean_side / 500))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable sans font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # fixed-size bitmap font


def _tag_size(font, text: str, pad: int) -> tuple[int, int]:
    left, _, right, _ = font.getbbox(text)
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()  # one height for every tag, whatever its letters
    else:
        _, top, _, bottom = font.getbbox("Ag")
        ascent, descent = bottom - top, 0
    return int(right - left) + 2 * pad, int(ascent + descent) + 2 * pad


def layout_tags(
    boxes_xyxy: Sequence[Sequence[float]] | np.ndarray,
    tag_sizes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
) -> list[Rect]:
    """Place one tag per box so that every tag lies inside the image and no two tags overlap.

    Args:
        boxes_xyxy: (N, 4) boxes ``x1, y1, x2, y2`` in pixels, in PRIORITY order (best score
            first): earlier boxes get the better spots.
        tag_sizes: N ``(width, height)`` tag sizes in pixels.
        image_size: ``(height, width)`` of the image.

    Returns:
        N integer rects ``(x1, y1, x2, y2)`` (x2/y2 exclusive), each inside
        ``[0, width] x [0, height]`` (a tag larger than the image is cut to its size). Each tag
        goes to the first free spot among: above the box, inside its top edge, below the box
        (all left-aligned, then right-aligned with the box), then further up or down, then
        anywhere in the image nearest the box. Only when no spot is free at all does a tag
        overlap others, and then where it overlaps least.
    """
    h, w = int(image_size[0]), int(image_size[1])
    placed = np.zeros((0, 4), dtype=np.int64)
    rects: list[Rect] = []
    for (bx1, by1, bx2, by2), (tw, th) in zip(np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4), tag_sizes):
        tw, th = max(1, min(int(tw), w)), max(1, min(int(th), h))
        cand = _candidates(bx1, by1, bx2, by2, tw, th, w, h)
        if len(placed):
            ix = np.minimum(cand[:, None, 2], placed[None, :, 2]) - np.maximum(cand[:, None, 0], placed[None, :, 0])
            iy = np.minimum(cand[:, None, 3], placed[None, :, 3]) - np.maximum(cand[:, None, 1], placed[None, :, 1])
            overlap = (np.clip(ix, 0, None) * np.clip(iy, 0, None)).sum(axis=1)
            best = int(np.argmin(overlap))  # the first zero if any: candidates are in preference order
        else:
            best = 0
        rect = tuple(int(v) for v in cand[best])
        rects.append(rect)  # type: ignore[arg-type]
        placed = np.vstack([placed, cand[best:best + 1]])
    return rects


def _candidates(bx1: float, by1: float, bx2: float, by2: float, tw: int, th: int, w: int, h: int) -> np.ndarray:
    """(C, 4) tag rects in preference order, clamped into the image."""
    x1, y1, x2, y2 = round(bx1), round(by1), round(bx2), round(by2)
    rows = [y1 - th, y1, y2]  # above, inside top, below
    lefts = [x1, x2 - tw]  # left-aligned with the box, then right-aligned
    steps = range(1, h // th + 2)
    stacked = [y for k in steps for y in (y1 - th - k * th, y2 + k * th)]  # further up / down, alternating
    xy = [(x, y) for x in lefts for y in rows] + [(x, y) for y in stacked for x in lefts]
    # Last resort: a grid over the whole image, nearest to the box's top-left corner first.
    gx = np.arange(0, max(1, w - tw + 1), max(1, tw // 2))
    gy = np.arange(0, max(1, h - th + 1), th)
    grid = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)
    grid = grid[np.argsort(np.abs(grid[:, 0] - x1) + np.abs(grid[:, 1] - (y1 - th)), kind="stable")]
    pts = np.concatenate([np.asarray(xy, dtype=np.int64).reshape(-1, 2), grid.astype(np.int64)])
    pts[:, 0] = np.clip(pts[:, 0], 0, w - tw)
    pts[:, 1] = np.clip(pts[:, 1], 0, h - th)
    return np.concatenate([pts, pts + np.array([tw, th])], axis=1)


def _leader(tag: Rect, box: Sequence[float]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """A short line from a tag to its box when the two do not touch (the tag was pushed away)."""
    bx1, by1, bx2, by2 = box
    cx, cy = (tag[0] + tag[2]) / 2, (tag[1] + tag[3]) / 2
    px, py = min(max(cx, bx1), bx2), min(max(cy, by1), by2)  # nearest box point to the tag centre
    qx, qy = min(max(px, tag[0]), tag[2] - 1), min(max(py, tag[1]), tag[3] - 1)  # nearest tag point to it
    if abs(px - qx) <= 1 and abs(py - qy) <= 1:
        return None
    return (round(qx), round(qy)), (round(px), round(py))


def draw_detections(
    image: ImageSource,
    dets: Detections,
    *,
    font_size: int | None = None,
    line_width: int | None = None,
    show_scores: bool = True,
) -> np.ndarray:
    """Draw ``dets`` on a copy of ``image``; returns an HxWx3 uint8 RGB array.

    Args:
        image: a path, PIL image, HxWx3 RGB array or tensor (anything ``regionclip.io.load_image``
            takes); boxes are in its pixels.
        dets: the detections; boxes are drawn in one colour per label, each with a
            ``"label score"`` tag. Tags never leave the image and do not overlap each other
            while the image has room; the best-scoring detections get the spots nearest their
            boxes (see ``layout_tags``).
        font_size, line_width: in pixels; by default they grow with the image (``default_sizes``).
        show_scores: append the score to each label.
    """
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    auto_font, auto_line = default_sizes((h, w))
    font = _font(int(font_size or auto_font))
    line = int(line_width or auto_line)
    pad = max(1, (font_size or auto_font) // 6)
    d = dets.cpu()
    order = np.argsort(-d.scores.float().numpy(), kind="stable")  # best first
    boxes = d.boxes_xyxy.float().numpy()[order]
    scores = d.scores.float().numpy()[order]
    label_ids = d.label_ids.numpy()[order]
    texts = [
        (d.vocabulary[i] if d.vocabulary else str(i)) + (f" {s:.2f}" if show_scores else "")
        for i, s in zip(label_ids.tolist(), scores.tolist())
    ]
    sizes = [_tag_size(font, t, pad) for t in texts]
    tags = layout_tags(boxes, sizes, (h, w))

    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    for k in range(len(order) - 1, -1, -1):  # worst first, so the best box is drawn on top
        x1, y1, x2, y2 = boxes[k]
        x1, y1 = min(max(round(x1), 0), w - 1), min(max(round(y1), 0), h - 1)
        x2, y2 = min(max(round(x2) - 1, x1), w - 1), min(max(round(y2) - 1, y1), h - 1)
        draw.rectangle((x1, y1, x2, y2), outline=_colour(int(label_ids[k])), width=line)
    for k in range(len(order)):  # a pushed-away tag gets a thin line to its box
        lead = _leader(tags[k], boxes[k])
        if lead is not None:
            draw.line(lead, fill=_colour(int(label_ids[k])), width=1)
    for k in range(len(order) - 1, -1, -1):  # tags last: no box or line crosses a tag
        colour = _colour(int(label_ids[k]))
        tx1, ty1, tx2, ty2 = tags[k]
        draw.rectangle((tx1, ty1, tx2 - 1, ty2 - 1), fill=colour)
        left, _, _, _ = font.getbbox(texts[k])
        draw.text((tx1 + pad - left, ty1 + pad), texts[k], fill=_ink(colour), font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def save_annotated(path: str | os.PathLike, image: ImageSource, dets: Detections, **draw_options) -> Path:
    """Draw ``dets`` on ``image`` (see ``draw_detections``) and write it to ``path``; returns the path.

    The format follows the extension: ``.jpg``/``.jpeg`` (quality 95), ``.png``, ``.bmp``,
    ``.tif``/``.tiff``, ``.webp``. Missing parent folders are created, and the file is written to
    a temporary name and renamed, so a failed write never leaves half an image.

    Raises:
        BadOutput: an unknown extension, or a path that cannot be written (a folder, a parent
            that is a file, no permission); checked before anything is drawn.
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if path.suffix.lower() not in WRITABLE_IMAGE_EXTENSIONS or fmt not in Image.SAVE:
        raise BadOutput(
            f"cannot save an image as {path}: unknown extension '{path.suffix}'; "
            f"use one of {', '.join(WRITABLE_IMAGE_EXTENSIONS)}"
        )
    check_output_file(path, "annotated image")
    annotated = Image.fromarray(draw_detections(image, dets, **draw_options))
    buffer = io.BytesIO()
    annotated.save(buffer, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return atomic_write_bytes(path, buffer.getvalue())
