"""Draw ``Detections`` on images with OpenCV."""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import cv2
import numpy as np

from .detections import Detections


def _colour(label_id: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps keep neighbouring label ids far apart in colour.
    r, g, b = colorsys.hsv_to_rgb((label_id * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image_rgb: np.ndarray, dets: Detections) -> np.ndarray:
    """Return a copy of HxWx3 uint8 RGB ``image_rgb`` with boxes and "label score" tags drawn."""
    out = np.ascontiguousarray(image_rgb.copy())
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    font_scale = max(0.4, min(h, w) / 900)
    d = dets.cpu()
    for (x1, y1, x2, y2), score, label_id in zip(d.boxes_xyxy.tolist(), d.scores.tolist(), d.label_ids.tolist()):
        colour = _colour(label_id)
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, colour, thick, cv2.LINE_AA)
        name = d.vocabulary[label_id] if d.vocabulary else str(label_id)
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        # Tags sit above the box, or inside it when the box touches the top edge.
        ty = p1[1] - 2 if p1[1] - th - base - 2 >= 0 else p1[1] + th + base + 2
        tx = min(max(p1[0], 0), max(0, w - tw - 2))
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw + 2, ty + 2), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        cv2.putText(out, text, (tx + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, ink, 1, cv2.LINE_AA)
    return out


def save_annotated(path: str | os.PathLike, image_rgb: np.ndarray, dets: Detections) -> Path:
    """Draw and write to ``path`` (format from its extension); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(draw_detections(image_rgb, dets), cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"could not write {path}")
    return path
