"""Tiled detection: small objects in large images.

A detector that shrinks a whole 4000 px photo to its input (the demo's 320 px) turns a 20 px
object into 2 px. Tiling cuts a large image into overlapping windows of ``size`` original pixels;
each window goes through the same stages as any image (in padded batches of windows, with the
vocabulary encoded once by the caller), and the whole image goes through once more, reduced as
usual, so objects larger than a window are still found. The windows' boxes are mapped back to
original pixels and merged with the whole pass's (``merge``).

A box cut by a window's inner edge is the part of an object the window saw. When another window
holds that part away from its own inner edges, that window saw past the cut, and with an overlap
at least the object's size it saw the object whole: the cut piece is dropped. Pieces that no
window sees whole (objects larger than the overlap) stay, and the merge fuses a cut piece into
the box that absorbs it: their union, so the two halves of an object come back as one box.

Memory: the image is decoded once, at the scale the windows need (JPEGs through draft mode when
a window is larger than the model's input), and windows are cut from it a batch at a time; a
100-megapixel photo never exists as thousands of float tiles.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.ops import box_area, box_iou

from .config import ScoringConfig
from .detections import Detections
from .doubt import Doubt
from .errors import BadInput
from .io import LoadedImage, image_size, load_image, load_reduced, reduce

DEFAULT_OVERLAP = 0.2  # of the window: 64 px at 320, so objects up to 64 px lie whole in some window
MIN_TILE = 64  # smaller windows leave a detector's FPN almost nothing, and their number explodes
MAX_OVERLAP = 0.75  # 0.75 already runs 16x the windows of no overlap
# A cut piece and the box it is fused into: the piece lies mostly inside that box. IoU alone
# misses it (half an object against the whole is IoU 0.5 at best, a third 0.33).
FUSE_IOS = 0.5


@dataclass(frozen=True)
class Tiling:
    """Windows of ``size`` x ``size`` original pixels overlapping by ``overlap`` of that size."""

    size: int
    overlap: float = DEFAULT_OVERLAP

    @property
    def margin(self) -> float:
        """Pixels from a window's edge within which a box counts as touching it: refined boxes
        of a cut object end at the edge give or take a pixel or two."""
        return max(2.0, 0.01 * self.size)

    def applies(self, h: int, w: int) -> bool:
        """Whether an image of (h, w) is tiled: one no larger than a window runs as it is."""
        return max(h, w) > self.size

    def load(self, source, max_side: int | None) -> LoadedImage | TiledImage:
        """``source`` decoded for these windows (``load_tiled``)."""
        return load_tiled(source, self, max_side)

    def windows(self, h: int, w: int) -> np.ndarray:
        """(K, 4) int64 xyxy windows in original pixels, row by row, covering the image. Along a
        side longer than ``size`` the windows are evenly spaced with at least ``overlap`` between
        neighbours, the last ending at the image's edge; a shorter side is one window."""
        xs, ys = _starts(w, self.size, self.overlap), _starts(h, self.size, self.overlap)
        return np.array([(x, y, min(x + self.size, w), min(y + self.size, h)) for y in ys for x in xs],
                        dtype=np.int64)


def _starts(length: int, size: int, overlap: float) -> list[int]:
    if length <= size:
        return [0]
    n = math.ceil((length - size) / (size * (1 - overlap))) + 1
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


def check_tiling(size, overlap=None) -> Tiling | None:
    """``Tiling(size, overlap)`` checked (``BadInput`` naming the value); None when ``size`` is None.

    ``size``: window side in original pixels, an int >= ``MIN_TILE``; ``overlap``: share of the
    window that neighbours share, in [0, ``MAX_OVERLAP``] (None: ``DEFAULT_OVERLAP``)."""
    if size is None:
        if overlap is not None:
            raise BadInput("tile_overlap needs tile (the window side in pixels, e.g. 640)")
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) and not (
            isinstance(size, float) and size.is_integer()):
        raise BadInput(f"tile must be a whole number of pixels, but got {size!r}")
    if int(size) < MIN_TILE:
        raise BadInput(f"tile must be at least {MIN_TILE} pixels, but got {size}")
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float, np.floating)) \
            or not 0.0 <= float(overlap) <= MAX_OVERLAP:
        raise BadInput(f"tile_overlap must be a share of the tile in [0, {MAX_OVERLAP}], e.g. 0.2, but got {overlap!r}")
    return Tiling(int(size), float(overlap))


@dataclass
class TiledImage:
    """An image to detect in windows: its ``source`` (a path or archive member, decoded only
    when ``decode`` is called, or decoded pixels) and its (h, w) ``original_size``."""

    source: Any
    original_size: tuple[int, int]
    tiling: Tiling
    max_side: int | None  # the model's input_max_side: what each window is reduced to

    @property
    def scale(self) -> float:
        """Decoded pixels per original pixel: a window larger than the model's input is reduced
        anyway, so the image need not decode finer than that."""
        if self.max_side is None:
            return 1.0
        return min(1.0, self.max_side / self.tiling.size)

    def decode(self) -> np.ndarray:
        """HxWx3 uint8 at ``scale`` (JPEGs in draft mode): ``BadImage`` if it cannot be read."""
        if isinstance(self.source, np.ndarray):
            return reduce(self.source, _side(self.original_size, self.scale))
        return load_reduced(self.source, _side(self.original_size, self.scale)).pixels

    def tiles(self, pixels: np.ndarray) -> Iterator[tuple[np.ndarray, LoadedImage]]:
        """``(window xyxy in original pixels, the window as a LoadedImage)`` one at a time: views
        into ``pixels`` (``decode``'s), each reduced to ``max_side`` only when it is larger."""
        oh, ow = self.original_size
        sy, sx = pixels.shape[0] / oh, pixels.shape[1] / ow
        for x0, y0, x1, y1 in self.tiling.windows(oh, ow):
            crop = pixels[round(y0 * sy):round(y1 * sy), round(x0 * sx):round(x1 * sx)]
            yield np.array([x0, y0, x1, y1]), LoadedImage(reduce(crop, self.max_side), (int(y1 - y0), int(x1 - x0)))

    def whole(self, pixels: np.ndarray) -> LoadedImage:
        """The whole image as the untiled path decodes it (reduced to ``max_side``)."""
        return LoadedImage(reduce(pixels, self.max_side), self.original_size)


def _side(original_size: tuple[int, int], scale: float) -> int | None:
    return None if scale >= 1.0 else max(1, math.ceil(max(original_size) * scale))


def load_tiled(source, tiling: Tiling, max_side: int | None) -> LoadedImage | TiledImage:
    """``source`` decoded for ``tiling``: a ``TiledImage`` when it is larger than a window (a file
    is then only opened for its size; its pixels are decoded when detection reaches it), else a
    ``LoadedImage`` as ``io.load_reduced`` gives it. ``BadImage`` for what cannot be read."""
    if isinstance(source, (str, os.PathLike)) or hasattr(source, "open_image"):
        size = image_size(Path(str(source)) if not hasattr(source, "open_image") else source)
        if not tiling.applies(*size):
            return load_reduced(source, max_side)
        return TiledImage(source, size, tiling, max_side)
    if isinstance(source, TiledImage):
        return source
    if isinstance(source, LoadedImage):  # already decoded: tiles come from what it holds
        pixels, size = source.pixels, source.original_size
    else:
        pixels = load_image(source)
        size = pixels.shape[:2]
    if not tiling.applies(*size):
        return LoadedImage(reduce(pixels, max_side), size)
    return TiledImage(pixels, (int(size[0]), int(size[1])), tiling, max_side)


# ------------------------------------------------------------------------------------ detect
# A batch of decoded images -> per image (one Detections per scoring config, proposals or None);
# Detections and proposals in the images' original pixels.
RunBatch = Callable[[list[LoadedImage]], list[tuple[list[Detections], Any]]]


@dataclass
class TiledResult:
    detections: list[Detections]  # one per scoring config, original pixels
    proposals: tuple[torch.Tensor, torch.Tensor] | None  # every pass's, by objectness
    pixels: np.ndarray  # what was decoded (for drawing)


def detect_tiled(image: TiledImage, run_batch: RunBatch, configs: Sequence[ScoringConfig],
                 batch_size: int) -> TiledResult:
    """Detect in ``image``'s windows, ``batch_size`` at a time, and in the whole image; merge.

    ``run_batch`` runs the model over a list of decoded images (``RunBatch``); ``configs``: the
    scoring of each of its Detections, whose NMS settings and ``max_detections`` the merge
    applies to the whole image. Windows are cut and run a batch at a time; only their boxes stay."""
    pixels = image.decode()
    (h, w), tiling = image.original_size, image.tiling
    windows = torch.as_tensor(tiling.windows(h, w), dtype=torch.float32)
    parts: list[list[tuple[Detections, torch.Tensor]]] = [[] for _ in configs]  # per config: (dets, cut)
    found = []
    (whole, props), = run_batch([image.whole(pixels)])
    for k, d in enumerate(whole):
        parts[k].append((d, torch.zeros(len(d), dtype=torch.bool, device=d.boxes_xyxy.device)))
    if props is not None:
        found.append(props)
    tiles = image.tiles(pixels)
    while batch := [t for _, t in zip(range(batch_size), tiles)]:
        for (window, _), (dets, props) in zip(batch, run_batch([t for _, t in batch])):
            window = torch.as_tensor(window, dtype=torch.float32)
            for k, d in enumerate(dets):
                shifted = Detections(d.boxes_xyxy + window.to(d.boxes_xyxy)[:2].repeat(2), d.scores, d.label_ids,
                                     d.vocabulary, d.doubt)
                keep, cut = _cut_pieces(shifted.boxes_xyxy, window, windows, (h, w), tiling.margin)
                parts[k].append((shifted[keep], cut[keep]))
            if props is not None:
                found.append((props[0] + window.to(props[0])[:2].repeat(2), props[1]))
    merged = [merge(_joined([d for d, _ in p]), torch.cat([c for _, c in p]), cfg) for p, cfg in zip(parts, configs)]
    proposals = None
    if found:
        boxes, objectness = torch.cat([b for b, _ in found]), torch.cat([o for _, o in found])
        order = torch.argsort(objectness, descending=True, stable=True)
        proposals = (boxes[order], objectness[order])
    return TiledResult(merged, proposals, pixels)


def _joined(dets: list[Detections]) -> Detections:
    """The passes' detections as one, their doubt figures too when every pass has them (the
    image's near miss: the largest of the passes')."""
    doubt = None
    if all(d.doubt is not None for d in dets):
        doubt = Doubt(torch.cat([d.doubt.margins for d in dets]), torch.cat([d.doubt.threshold_gaps for d in dets]),
                      torch.stack([d.doubt.near_miss for d in dets]).max())
    return Detections(torch.cat([d.boxes_xyxy for d in dets]), torch.cat([d.scores for d in dets]),
                      torch.cat([d.label_ids for d in dets]), dets[0].vocabulary, doubt)


def _cut_pieces(boxes: torch.Tensor, window: torch.Tensor, windows: torch.Tensor, size: tuple[int, int],
                margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For (N, 4) xyxy boxes found in ``window`` (original pixels): ``(keep, cut)``, both (N,)
    bool. ``cut``: the box touches one of the window's inner edges (an edge inside the image).
    A cut box is not kept when another of ``windows`` (K, 4) holds it away from its own inner
    edges: that window saw past the cut."""
    h, w = size
    windows = windows.to(boxes)
    window = window.to(boxes)
    inner = torch.stack([window[0] > 0, window[1] > 0, window[2] < w, window[3] < h])
    near = torch.stack([boxes[:, 0] <= window[0] + margin, boxes[:, 1] <= window[1] + margin,
                        boxes[:, 2] >= window[2] - margin, boxes[:, 3] >= window[3] - margin], dim=1)
    cut = (near & inner).any(dim=1)
    if not bool(cut.any()):
        return torch.ones_like(cut), cut
    b, wins = boxes[:, None], windows[None]
    limits = [w, h]
    # Inside another window with a margin from each of its edges that lies inside the image.
    inside = torch.ones(len(boxes), len(windows), dtype=torch.bool, device=boxes.device)
    for axis in (0, 1):
        lo, hi = wins[..., axis], wins[..., axis + 2]
        inside &= (b[..., axis] >= lo + margin) | (lo <= 0)
        inside &= (b[..., axis + 2] <= hi - margin) | (hi >= limits[axis])
    inside &= ~(windows == window).all(dim=1)[None]
    return ~(cut & inside.any(dim=1)), cut


def merge(dets: Detections, cut: torch.Tensor, cfg: ScoringConfig) -> Detections:
    """One image's boxes from every pass (original pixels) -> its detections.

    Greedy, best score first: a box absorbs the later boxes of its label (of any label under
    ``cfg.agnostic_nms``) that overlap it at the NMS IoU (``nms_iou``, ``agnostic_nms_iou``) or,
    where either is a ``cut`` piece, lie mostly inside one another (``FUSE_IOS``). Absorbing a
    cut piece (or being one) grows the box to their union. The best ``cfg.max_detections`` are kept.

    Each box is compared with the kept boxes only (at most ``max_detections``), so thousands of
    windows' boxes at score threshold 0 cost N x K comparisons, not N x N; once the kept boxes
    are all there, the rest only grow or vanish and are compared in blocks."""
    if not len(dets):
        return dets
    order = torch.argsort(dets.scores, descending=True, stable=True)
    boxes, scores, labels, cut = dets.boxes_xyxy[order].float(), dets.scores[order], dets.label_ids[order], cut[order]
    kept: list[int] = []
    grown = boxes.new_zeros((0, 4))
    i, n = 0, len(boxes)
    while i < n and len(kept) < cfg.max_detections:  # one at a time: a box not absorbed is kept
        taken = _absorbs(boxes[kept], labels[kept], cut[kept], boxes[i:i + 1], labels[i:i + 1], cut[i:i + 1], cfg)[:, 0]
        if bool(taken.any()):
            k = int(torch.nonzero(taken)[0])
            if bool(cut[i] | cut[kept[k]]):
                grown[k] = torch.cat([torch.minimum(grown[k, :2], boxes[i, :2]), torch.maximum(grown[k, 2:], boxes[i, 2:])])
        else:
            kept.append(i)
            grown = torch.cat([grown, boxes[i:i + 1]])
        i += 1
    idx = torch.tensor(kept, dtype=torch.long, device=boxes.device)
    for s in range(i, n, 4096):  # the rest: absorbed by the first kept box that takes them, or gone
        part = slice(s, min(s + 4096, n))
        taken = _absorbs(boxes[idx], labels[idx], cut[idx], boxes[part], labels[part], cut[part], cfg)
        first = taken.to(torch.uint8).argmax(dim=0)
        grow = taken.any(dim=0) & (cut[part] | cut[idx][first])
        if bool(grow.any()):
            to = first[grow][:, None].expand(-1, 2)
            grown[:, :2].scatter_reduce_(0, to, boxes[part][grow, :2], "amin")
            grown[:, 2:].scatter_reduce_(0, to, boxes[part][grow, 2:], "amax")
    doubt = dets.doubt[order][idx] if dets.doubt is not None else None
    return Detections(grown, scores[idx], labels[idx], dets.vocabulary, doubt)


def _absorbs(kept_boxes: torch.Tensor, kept_labels: torch.Tensor, kept_cut: torch.Tensor, boxes: torch.Tensor,
             labels: torch.Tensor, cut: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    """(K, M) bool: kept box k absorbs box m (``merge``'s rule)."""
    iou = box_iou(kept_boxes, boxes)
    a, b = box_area(kept_boxes)[:, None], box_area(boxes)[None]
    inter = iou * (a + b) / (1 + iou)
    ios = inter / torch.minimum(a, b).clamp(min=1e-6)
    thr = cfg.agnostic_nms_iou if cfg.agnostic_nms else cfg.nms_iou
    take = (iou >= thr) | ((ios >= FUSE_IOS) & (kept_cut[:, None] | cut[None]))
    return take if cfg.agnostic_nms else take & (kept_labels[:, None] == labels[None])
