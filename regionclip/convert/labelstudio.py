"""Label Studio: a tasks JSON whose ``predictions`` hold our boxes, and the labelling config beside it.

A new project given ``config.xml`` as its labelling interface imports ``tasks.json`` and shows
every box as a pre-annotation. Boxes go in Label Studio's ``rectanglelabels`` shape: ``x``,
``y``, ``width``, ``height`` in percent of ``original_width`` / ``original_height``. The same
result shape is what ``regionclip serve``'s ``/predict`` answers, so both share ``prediction``.
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from ..atomic import atomic_write_text
from ..records import Results
from ._common import clip_xyxy, output_folder, size_of, usable, vocabulary

FROM_NAME, TO_NAME, DATA_KEY = "label", "image", "image"


def prediction(boxes_xyxy, labels: list[str], scores, width: int, height: int, *, from_name: str = FROM_NAME,
               to_name: str = TO_NAME, model_version: str = "regionclip") -> dict:
    """One Label Studio prediction of ``boxes_xyxy`` ((N, 4) original pixels) on a ``width`` x
    ``height`` image: ``{"model_version", "score" (the mean), "result": [rectanglelabels ...]}``."""
    boxes = clip_xyxy(np.asarray(boxes_xyxy, np.float64).reshape(-1, 4), width, height)
    scores = np.asarray(scores, np.float64).reshape(-1)
    result = []
    for i, ((x1, y1, x2, y2), name, score) in enumerate(zip(boxes, labels, scores)):
        result.append({
            "id": f"r{i}", "from_name": from_name, "to_name": to_name, "type": "rectanglelabels",
            "original_width": int(width), "original_height": int(height), "image_rotation": 0,
            "value": {"x": 100.0 * x1 / width, "y": 100.0 * y1 / height, "width": 100.0 * (x2 - x1) / width,
                      "height": 100.0 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [name]},
            "score": float(score),
        })
    return {"model_version": model_version, "score": float(scores.mean()) if len(scores) else 0.0,
            "result": result}


def config_xml(labels: list[str], *, from_name: str = FROM_NAME, to_name: str = TO_NAME) -> str:
    """The labelling interface: one ``Image`` (value ``$image``) and ``RectangleLabels`` of ``labels``."""
    lines = ["<View>", f"  <Image name={quoteattr(to_name)} value=\"${DATA_KEY}\"/>",
             f"  <RectangleLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>"]
    lines += [f"    <Label value={quoteattr(name)}/>" for name in labels]
    return "\n".join(lines + ["  </RectangleLabels>", "</View>", ""])


def write(results: Results, out: Path, *, min_score: float | None = None, from_name: str = FROM_NAME,
          to_name: str = TO_NAME, model_version: str | None = None, image_prefix: str = "", **_) -> Path:
    """Write ``out/tasks.json`` (one task per decoded image, ``data.image`` = ``image_prefix`` + its
    path as the run wrote it) and ``out/config.xml``; returns ``out``."""
    records = usable(results, min_score)
    version = model_version or results.model or "regionclip"
    tasks = []
    for r in records:
        w, h = size_of(r, "labelstudio")
        tasks.append({"data": {DATA_KEY: f"{image_prefix}{r.image}"},
                      "predictions": [prediction(r.boxes_xyxy, r.labels, r.scores, w, h, from_name=from_name,
                                                 to_name=to_name, model_version=version)]})
    out = output_folder(Path(out))
    atomic_write_text(out / "config.xml", config_xml(vocabulary(results, records), from_name=from_name,
                                                     to_name=to_name))
    atomic_write_text(out / "tasks.json", json.dumps(tasks, indent=1))
    return out
