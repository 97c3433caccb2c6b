"""Per-class score thresholds fitted on a labelled set: ``regionclip calibrate``.

The model detects every image of a COCO set with the vocabulary (its negatives applied, its own
thresholds set aside, every score kept); each detection is matched to the ground truth of its
class (IoU >= 0.5, best-scoring first, each GT box once, as COCO's AP50 matches). Per class, the
detections ranked by score give precision and recall at every threshold; the chosen one is the
lowest reaching the ``precision`` target (the most recall at that precision), or the one of the
best F1 (``max_f1``). A class whose target is out of reach gets the threshold of its best
precision, flagged ``reached: false``. ``measure`` gives the same figures for fixed thresholds
on another set (does the promise hold?).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from .errors import BadInput
from .vocabulary import Vocabulary

IOU = 0.5


@dataclasses.dataclass
class ClassFit:
    """One class: the chosen ``threshold`` and the ``precision`` / ``recall`` it gave on the
    calibration set (``detections`` kept at it, ``gt`` boxes), ``reached``: the target was met."""

    name: str
    threshold: float | None
    precision: float | None
    recall: float | None
    detections: int
    gt: int
    reached: bool = True


def collect(predictor, coco, images_dir: str | Path, vocab: Vocabulary, *, batch_size: int = 8,
            progress: Callable[[int], None] | None = None) -> dict[str, list[tuple[float, bool]]]:
    """Per class name, ``(score, true positive)`` of every detection on the set (threshold 0,
    ``vocab``'s own thresholds ignored), plus ``"__gt__/NAME"`` entries holding the GT count."""
    from .eval_protocols import gt_boxes

    names = vocab.names
    cat = {c["name"]: c["id"] for c in coco.cats.values()}
    missing = [n for n in names if n not in cat]
    if missing:
        raise BadInput(f"class {missing[0]!r} is not a category of the annotation file: calibration needs its "
                       f"ground truth (categories: {', '.join(sorted(cat)[:12])})")
    free = Vocabulary(tuple(dataclasses.replace(c, threshold=None) for c in vocab.classes))
    ids = sorted(coco.imgs)
    paths = [Path(images_dir) / coco.imgs[i]["file_name"] for i in ids]
    out: dict[str, list] = {n: [] for n in names}
    gt_count = dict.fromkeys(names, 0)
    for p in predictor.stream(paths, vocab=free, batch_size=batch_size, score_threshold=0.0):
        if p.error is not None:
            raise BadInput(f"calibration image unreadable: {p.error}")
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[ids[p.index]]))
        _, gt = gt_boxes(coco, ids[p.index])
        gt_labels = [a["category_id"] for a in anns if not a.get("iscrowd", 0)]
        d = p.detections.cpu()
        for k, name in enumerate(names):
            g = gt[torch.tensor([lab == cat[name] for lab in gt_labels], dtype=torch.bool)] if len(gt) else gt
            gt_count[name] += len(g)
            mine = d.label_ids == k
            out[name] += match(d.boxes_xyxy[mine], d.scores[mine], g)
        if progress is not None:
            progress(1)
    for name, n in gt_count.items():
        out[f"__gt__/{name}"] = n
    return out


def match(boxes_xyxy: torch.Tensor, scores: torch.Tensor, gt_xyxy: torch.Tensor) -> list[tuple[float, bool]]:
    """One image and class: ``(score, true positive)`` per detection, highest score first taking
    the unmatched GT box of highest IoU >= 0.5."""
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes_xyxy[order].float(), gt_xyxy.float()) if len(gt_xyxy) else None
    taken = torch.zeros(len(gt_xyxy), dtype=torch.bool)
    out = []
    for row, i in enumerate(order.tolist()):
        hit = False
        if iou is not None:
            cand = iou[row].masked_fill(taken, -1)
            best = int(cand.argmax())
            if float(cand[best]) >= IOU:
                taken[best] = hit = True
        out.append((float(scores[i]), hit))
    return out


def curve(pairs: Sequence[tuple[float, bool]], gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, precision, recall), one point per detection ranked by score: keeping every
    detection scoring at least ``thresholds[i]``."""
    if not pairs:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    pairs = sorted(pairs, key=lambda p: -p[0])
    scores = np.array([p[0] for p in pairs])
    tp = np.cumsum([p[1] for p in pairs])
    # Ties: a threshold keeps every detection of its score, so only a tie's last point is reachable.
    last = np.append(scores[1:] != scores[:-1], True)
    kept = np.arange(1, len(pairs) + 1)
    return scores[last], (tp / kept)[last], (tp / max(gt, 1))[last]


def fit(collected: dict, names: Sequence[str], precision: float | None = None) -> list[ClassFit]:
    """Per class, the threshold for ``precision`` (a fraction in (0, 1]) or, with None, max F1."""
    if precision is not None and not 0 < precision <= 1:
        raise BadInput(f"--precision must be in (0, 1], but got {precision}")
    fits = []
    for name in names:
        gt = collected[f"__gt__/{name}"]
        thr, prec, rec = curve(collected[name], gt)
        if not len(thr) or gt == 0:
            fits.append(ClassFit(name, None, None, None, 0, gt, reached=False))
            continue
        if precision is None:
            f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
            i, reached = int(np.argmax(f1)), True
        else:
            ok = np.nonzero(prec >= precision)[0]
            reached = len(ok) > 0
            i = int(ok[-1]) if reached else int(np.argmax(prec))  # the lowest threshold that holds
        kept = int(np.sum(np.array([p[0] for p in collected[name]]) >= thr[i]))
        fits.append(ClassFit(name, float(thr[i]), float(prec[i]), float(rec[i]), kept, gt, reached))
    return fits


def measure(collected: dict, names: Sequence[str], thresholds: Sequence[float | None]) -> list[ClassFit]:
    """Precision and recall of each class at a fixed threshold (None: every detection)."""
    out = []
    for name, t in zip(names, thresholds):
        gt = collected[f"__gt__/{name}"]
        kept = [p for p in collected[name] if t is None or p[0] >= t]
        tp = sum(p[1] for p in kept)
        out.append(ClassFit(name, t, tp / len(kept) if kept else None, tp / gt if gt else None, len(kept), gt))
    return out


def tuned_file(vocab: Vocabulary, fits: Sequence[ClassFit], precision: float | None, source: dict) -> dict:
    """The tuned vocabulary file: the target and where it was fitted, then the classes with their
    thresholds (``Vocabulary.from_yaml`` reads it back)."""
    by_name = {f.name: f for f in fits}
    classes = Vocabulary(tuple(dataclasses.replace(c, threshold=by_name[c.name].threshold) for c in vocab.classes))
    target = {"precision": precision} if precision is not None else {"max_f1": True}
    expected = {f.name: {"precision": _r(f.precision), "recall": _r(f.recall), "gt": f.gt, "reached": f.reached}
                for f in fits}
    return {"target": target, "calibrated_on": source, "expected": expected, "classes": classes.to_yaml_dict()}


def _r(v):
    return None if v is None else round(float(v), 4)


def run_calibrate(annotations, images, vocab: Vocabulary, out, build: Callable, *, precision: float | None = None,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None) -> list[ClassFit]:
    """``regionclip calibrate`` as one call: checks, ``build()`` the model, fit, write ``out``."""
    import yaml

    from .atomic import atomic_write_text
    from .evaluate import load_ground_truth
    from .outputs import check_output_file

    if precision is not None and not 0 < precision <= 1:
        raise BadInput(f"--precision must be in (0, 1], but got {precision}")
    check_output_file(out, "--out")
    coco = load_ground_truth(annotations)
    if not Path(images).is_dir():
        raise BadInput(f"images folder not found: {images}")
    model = build()
    predictor = getattr(model, "predictor", model)
    collected = collect(predictor, coco, images, vocab, batch_size=batch_size, progress=progress)
    fits = fit(collected, vocab.names, precision)
    source = {"annotations": str(annotations), "images": str(images), "image_count": len(coco.imgs),
              "iou": IOU}
    atomic_write_text(Path(out), yaml.safe_dump(tuned_file(vocab, fits, precision, source), sort_keys=False))
    return fits
