"""The numpy half of an exported model: what stays outside the graphs, without torch.

Each function mirrors one torch / torchvision function the torch path calls, in float32 and in
the same order of operations, so the runtime's boxes match the torch model's (the graphs'
own outputs differ from torch by float rounding only). They live here rather than in the graphs
because their shapes depend on the data (top-k, NMS, per-box pyramid levels) or on sizes that
the runtime knows before a graph runs (resizing), which is where exporters break
(pytorch/vision #8937, #2311, #9306).

Images are (C, H, W) float32 arrays; boxes (N, 4) float32 ``x1, y1, x2, y2`` in pixels.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """``(image - mean) / std`` per channel, as torchvision's and CLIP's normalisation do."""
    mean = np.asarray(mean, dtype=F32)[:, None, None]
    std = np.asarray(std, dtype=F32)[:, None, None]
    return (image - mean) / std


def detector_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (h, w) ``GeneralizedRCNNTransform`` resizes an h x w image to (eval mode).

    Python doubles throughout, as torchvision's eager path computes the scale factor and
    ``F.interpolate`` (``recompute_scale_factor=True``) the output size.
    """
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(math.floor(float(h) * scale)), int(math.floor(float(w) * scale))


def pool_size(h: int, w: int, short_side: int, max_side: int) -> tuple[int, int]:
    """The (h, w) a pool-mode region encoder resizes to (``regions._DensePool.resize``)."""
    scale = min(short_side / min(h, w), max_side / max(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights (out, 2) of ``F.interpolate(mode="bilinear", align_corners=False)``
    along one axis (torch's ``area_pixel_compute_source_index`` with scale in / out)."""
    scale = F32(in_size) / F32(out_size)
    # One rounding of scale * (i + 0.5) - 0.5, as torch's compiled kernel gives (a fused multiply-add).
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(F32)
    src = np.maximum(src, F32(0))
    i0 = src.astype(np.int64)
    lam1 = np.clip(src - i0.astype(F32), F32(0), F32(1))
    i1 = np.minimum(i0 + 1, in_size - 1)
    return np.stack([i0, i1], 1), np.stack([F32(1) - lam1, lam1], 1)


def _antialias_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights (out, K) of ``F.interpolate(mode="bilinear", antialias=True)``: a
    triangle filter stretched by the downscale factor, normalised per output pixel (torch's
    ``_compute_indices_min_size_weights_aa``)."""
    # The kernel's float32 values and its double intermediates, rounding where it rounds.
    scale = F32(in_size) / F32(out_size)
    support = scale if scale >= 1 else F32(1)
    invscale = F32(1.0 / np.float64(scale)) if scale >= 1 else F32(1)
    center = (np.float64(scale) * (np.arange(out_size) + 0.5)).astype(F32)
    xmin = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)  # C++ casts truncate
    xsize = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(int(xsize.max()))[None]
    x = (((j + xmin[:, None]).astype(F32) - center[:, None]).astype(np.float64) + 0.5) * np.float64(invscale)
    w = np.maximum(F32(1) - np.abs(x.astype(F32)), F32(0))
    w[j >= xsize[:, None]] = 0
    total = w[:, 0].copy()
    for k in range(1, w.shape[1]):  # summed in order, as the kernel does
        total += w[:, k]
    w = np.divide(w, total[:, None], out=w, where=total[:, None] != 0)
    return np.minimum(xmin[:, None] + j, in_size - 1), w


def _resample(x: np.ndarray, axis: int, idx: np.ndarray, wts: np.ndarray) -> np.ndarray:
    out = None
    for k in range(idx.shape[1]):
        shape = [1] * x.ndim
        shape[axis] = -1
        term = np.take(x, idx[:, k], axis=axis) * wts[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def resize_bilinear(image: np.ndarray, size: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """(C, H, W) -> (C, h, w) as ``F.interpolate(image[None], size, mode="bilinear",
    align_corners=False, antialias=antialias)``: separable, width first, then height."""
    taps = _antialias_taps if antialias else _linear_taps
    out = image.astype(F32, copy=False)
    for axis, (n_in, n_out) in ((2, (image.shape[2], size[1])), (1, (image.shape[1], size[0]))):
        if n_in != n_out:
            out = _resample(out, axis, *taps(n_in, n_out))
    return np.ascontiguousarray(out, dtype=F32)


def pad_to(image: np.ndarray, divisor: int) -> np.ndarray:
    """Zero-pad (C, H, W) at the bottom and right to multiples of ``divisor`` (``batch.pad_stack``)."""
    d = max(1, int(divisor))
    h, w = image.shape[-2:]
    ph, pw = -(-h // d) * d - h, -(-w // d) * d - w
    if not ph and not pw:
        return image
    return np.pad(image, ((0, 0), (0, ph), (0, pw)))


def avg_pool2(image: np.ndarray) -> np.ndarray:
    """``F.avg_pool2d(x, 2, ceil_mode=True)`` on (C, H, W): the last odd row / column averages
    the pixels it has."""
    c, h, w = image.shape
    x = np.pad(image, ((0, 0), (0, h % 2), (0, w % 2)))
    total = x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]
    count = np.full(total.shape[1:], 4, dtype=F32)
    if h % 2:
        count[-1, :] /= 2
    if w % 2:
        count[:, -1] /= 2
    return total / count


def grid_anchors(cell_anchors: list[np.ndarray], grid_sizes: list[tuple[int, int]],
                 padded_size: tuple[int, int]) -> np.ndarray:
    """All anchors, level after level, as torchvision's ``AnchorGenerator`` lays them out:
    per level (row, column, cell anchor), strides the padded image size // the grid size."""
    out = []
    for cells, (gh, gw) in zip(cell_anchors, grid_sizes):
        sh, sw = padded_size[0] // gh, padded_size[1] // gw
        ys, xs = np.meshgrid(np.arange(gh) * sh, np.arange(gw) * sw, indexing="ij")
        shifts = np.stack([xs.ravel(), ys.ravel(), xs.ravel(), ys.ravel()], 1).astype(F32)
        out.append((shifts[:, None, :] + np.asarray(cells, dtype=F32)[None]).reshape(-1, 4))
    return np.concatenate(out)


def decode_boxes(deltas: np.ndarray, anchors: np.ndarray, weights, clip: float) -> np.ndarray:
    """torchvision ``BoxCoder.decode_single``: (N, 4) deltas on (N, 4) anchors -> (N, 4) xyxy."""
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + F32(0.5) * widths
    ctr_y = anchors[:, 1] + F32(0.5) * heights
    wx, wy, ww, wh = (F32(v) for v in weights)
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = np.minimum(deltas[:, 2] / ww, F32(clip))
    dh = np.minimum(deltas[:, 3] / wh, F32(clip))
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = F32(0.5) * (np.exp(dw) * widths)
    half_h = F32(0.5) * (np.exp(dh) * heights)
    return np.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], 1)


def clip_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``clip_boxes_to_image``: x into [0, w], y into [0, h]."""
    h, w = size
    out = boxes.copy()
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h)
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (F32(1) / (F32(1) + np.exp(-x))).astype(F32)


def topk_desc(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values of a 1-D array, largest first (``Tensor.topk``)."""
    k = min(int(k), len(x))
    if k < len(x):
        part = np.argpartition(-x, k - 1)[:k]
        return part[np.argsort(-x[part], kind="stable")]
    return np.argsort(-x, kind="stable")


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision ``nms`` (its CPU kernel, whose stable sort keeps ties in input order): indices
    kept, by decreasing score; a box goes when its IoU with a kept, better one is above
    ``iou_threshold``."""
    if not len(boxes):
        return np.zeros((0,), dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[order, i] for i in range(4))
    coords = [x1, y1, x2, y2, (x2 - x1) * (y2 - y1)]
    n = len(order)
    alive = np.ones(n, dtype=bool)
    keep = []
    if n <= 2048:
        # All pairs at once (a few MB), then one row operation per kept box: 5-10x faster on an
        # RPN's 1000-3000 boxes than one IoU computation per kept box.
        suppress = _over(coords, slice(None), slice(None), iou_threshold)
        for i in range(n):
            if alive[i]:
                keep.append(i)
                alive[i + 1:] &= ~suppress[i, i + 1:]
    else:
        for i in range(n):
            if alive[i]:
                keep.append(i)
                rest = i + 1 + np.nonzero(alive[i + 1:])[0]
                alive[rest[_over(coords, [i], rest, iou_threshold)[0]]] = False
    return order[np.asarray(keep, dtype=np.int64)]


def _over(coords: list[np.ndarray], rows, cols, iou_threshold: float) -> np.ndarray:
    """(rows, cols) IoU above the threshold for boxes given as x1, y1, x2, y2, area columns, with
    the kernel's float32 arithmetic, compared in float64 as its C++ compares a float with a double."""
    x1, y1, x2, y2, areas = coords

    def overlap(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        low = np.maximum(lo[rows, None], lo[None, cols])
        return np.maximum(F32(0), np.minimum(hi[rows, None], hi[None, cols]) - low)

    inter = overlap(x1, x2) * overlap(y1, y2)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (areas[rows, None] + areas[None, cols] - inter)
    return iou.astype(np.float64) > iou_threshold


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision ``batched_nms`` on the CPU: NMS within each value of ``idxs``, indices by
    decreasing score. Like torchvision, above 1000 boxes one NMS per value, else one NMS over
    boxes shifted apart per value (its float rounding included). Above 1000, boxes with exactly
    equal scores may come in another order (torchvision sorts those unstably)."""
    if not len(boxes):
        return np.zeros((0,), dtype=np.int64)
    if boxes.size > 4000:
        keep = np.zeros(len(boxes), dtype=bool)
        for value in np.unique(idxs):
            where = np.nonzero(idxs == value)[0]
            keep[where[nms(boxes[where], scores[where], iou_threshold)]] = True
        kept = np.nonzero(keep)[0]
        return kept[np.argsort(-scores[kept], kind="stable")]
    offsets = idxs.astype(F32) * (boxes.max() + F32(1))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``F.normalize(x, dim=-1)``."""
    norm = np.sqrt((x.astype(F32) ** 2).sum(axis=-1, keepdims=True))
    return x / np.maximum(norm, F32(eps))
