"""Label Studio: a tasks JSON whose ``predictions`` hold our boxes, and the labelling config beside it.

A new project given ``config.xml`` as its labelling interface imports ``tasks.json`` and shows
every box as a pre-annotation. Each task carries the image's review priority (``regionclip.doubt``)
twice: as ``data.priority``, a column of the data manager, and as its prediction's ``score``,
``1 - priority``: Label Studio's data manager sorts by prediction score, lowest (least sure)
first. Boxes go in Label Studio's ``rectanglelabels`` shape: ``x``,
``y``, ``width``, ``height`` in percent of ``original_width`` / ``original_height``. The same
result shape is what ``regionclip serve``'s ``/predict`` answers, so both share ``prediction``.

``read`` takes the corrections back: Label Studio's JSON export (a list of tasks) -> ``Results``
of people's boxes. Per task its latest annotation (``updated_at``, then ``created_at``, then
``id``), skipped ones (``was_cancelled``) left out; a task with none is not reviewed and is left
out too, while an annotation with no boxes says the image has none. Predictions are never read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import unquote
from xml.sax.saxutils import quoteattr

import numpy as np

from ..atomic import atomic_write_text
from ..doubt import priority_of, run_threshold
from ..errors import BadInput
from ..records import ImageRecord, Results, header_size
from ._common import annotated, clip_xyxy, output_folder, person_record, read_json, size_of, usable, vocabulary

FROM_NAME, TO_NAME, DATA_KEY = "label", "image", "image"


def prediction(boxes_xyxy, labels: list[str], scores, width: int, height: int, *, from_name: str = FROM_NAME,
               to_name: str = TO_NAME, model_version: str = "regionclip", score: float | None = None) -> dict:
    """One Label Studio prediction of ``boxes_xyxy`` ((N, 4) original pixels) on a ``width`` x
    ``height`` image: ``{"model_version", "score" (``score``, else the boxes' mean), "result":
    [rectanglelabels ...]}``."""
    boxes = clip_xyxy(np.asarray(boxes_xyxy, np.float64).reshape(-1, 4), width, height)
    scores = np.asarray(scores, np.float64).reshape(-1)
    result = []
    for i, ((x1, y1, x2, y2), name, box_score) in enumerate(zip(boxes, labels, scores)):
        result.append({
            "id": f"r{i}", "from_name": from_name, "to_name": to_name, "type": "rectanglelabels",
            "original_width": int(width), "original_height": int(height), "image_rotation": 0,
            "value": {"x": 100.0 * x1 / width, "y": 100.0 * y1 / height, "width": 100.0 * (x2 - x1) / width,
                      "height": 100.0 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [name]},
            "score": float(box_score),
        })
    if score is None:
        score = float(scores.mean()) if len(scores) else 0.0
    return {"model_version": model_version, "score": float(score), "result": result}


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
    threshold = run_threshold(results)
    tasks = []
    for r in records:
        w, h = size_of(r, "labelstudio")
        priority = round(priority_of(r, threshold), 6)
        tasks.append({"data": {DATA_KEY: f"{image_prefix}{r.image}", "priority": priority},
                      "predictions": [prediction(r.boxes_xyxy, r.labels, r.scores, w, h, from_name=from_name,
                                                 to_name=to_name, model_version=version, score=1.0 - priority)]})
    out = output_folder(Path(out))
    atomic_write_text(out / "config.xml", config_xml(vocabulary(results, records), from_name=from_name,
                                                     to_name=to_name))
    atomic_write_text(out / "tasks.json", json.dumps(tasks, indent=1))
    return out


def _latest(task: dict) -> dict | None:
    """The task's latest annotation that was submitted, not skipped; None when there is none."""
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def _box_xyxy(item: dict, width: float, height: float) -> list[float]:
    """A rectanglelabels value (percent of the image, rotated by ``rotation`` degrees clockwise
    about its top-left corner) -> the xyxy pixel box that holds it, clipped to the image."""
    v = item["value"]
    x, y, w, h = (float(v[k]) for k in ("x", "y", "width", "height"))
    x, y, w, h = x * width / 100, y * height / 100, w * width / 100, h * height / 100
    theta = math.radians(float(v.get("rotation") or 0.0))
    cos, sin = math.cos(theta), math.sin(theta)
    xs = [x + dx * cos - dy * sin for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    ys = [y + dx * sin + dy * cos for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    return clip_xyxy(np.array([[min(xs), min(ys), max(xs), max(ys)]]), width, height)[0].tolist()


def _image(task: dict, data_key: str, image_prefix: str) -> str:
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    ref = data.get(data_key)
    if not isinstance(ref, str):
        raise BadInput(f"task {task.get('id')}: no data.{data_key} image; pass the image field's name "
                       f"(--data-key) as the labelling config's $name")
    if image_prefix and ref.startswith(image_prefix):
        return unquote(ref[len(image_prefix):])  # Label Studio's local-file URLs quote the path
    return ref


def read(path: Path, *, image_prefix: str = "", data_key: str = DATA_KEY, from_name: str | None = None,
         **_) -> Results:
    """People's boxes in a Label Studio JSON export at ``path`` (rules above). ``image_prefix``
    (what ``write`` put before each path) is taken off ``data.image`` again; ``from_name``: only
    that RectangleLabels control's boxes (default: every one). Sizes come from the results'
    ``original_width``/``original_height``, else the image file."""
    tasks = read_json(path, "Label Studio JSON export")
    if not isinstance(tasks, list) or any(not isinstance(t, dict) or "data" not in t for t in tasks):
        raise BadInput(f"{path}: expected Label Studio's JSON export, a list of tasks with 'data' and "
                       "'annotations' (Export -> JSON in the project)")
    images: list[ImageRecord] = []
    for task in tasks:
        chosen = _latest(task)
        if chosen is None:
            continue
        items = [r for r in chosen.get("result") or [] if isinstance(r, dict) and r.get("type") == "rectanglelabels"
                 and (from_name is None or r.get("from_name") == from_name)]
        image = _image(task, data_key, image_prefix)
        size = next(((int(r["original_width"]), int(r["original_height"])) for r in chosen.get("result") or []
                     if isinstance(r, dict) and r.get("original_width") and r.get("original_height")), None)
        if size is None and Path(image).is_file():
            size = header_size(image)
        if items and size is None:
            raise BadInput(f"{path}: task {task.get('id')}: boxes without original_width/original_height and "
                           f"{image} is not here to measure; export again from Label Studio")
        boxes, labels = [], []
        try:
            for r in items:
                for name in r["value"]["rectanglelabels"]:
                    boxes.append(_box_xyxy(r, *size))
                    labels.append(str(name))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"{path}: task {task.get('id')}: a rectanglelabels result without "
                           f"{exc if isinstance(exc, KeyError) else 'numbers in its value'}") from None
        images.append(person_record(image, size, boxes, labels))
    if not images:
        raise BadInput(f"{path}: no task has a submitted annotation (skipped ones do not count); "
                       "export after people have submitted their corrections")
    return annotated(images, [], path, "labelstudio")
