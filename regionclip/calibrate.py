"""Per-class score thresholds fitted on a labelled set: ``regionclip calibrate``.

The model detects every image of a COCO set with the vocabulary (its negatives applied, its own
thresholds set aside) and keeps every detection its per-label NMS leaves (``collect``); each
detection is matched to the ground truth of its class (IoU >= 0.5, best-scoring first, each GT
box once, as COCO's AP50 matches). Per class, the detections ranked by score give precision and
recall at every threshold; the chosen one is the lowest reaching the ``precision`` target (the
most recall at that precision), or the one of the best F1 (``max_f1``). A class whose target is
out of reach gets the threshold of its best precision, flagged ``reached: false``.

In deployment the per-class thresholds act first and the class-agnostic NMS and
``max_detections`` then see only what passed them, so a class's figures depend on the other
classes' thresholds. ``fit_deployed`` replays those two steps on the collected detections with
the thresholds of the moment (``Candidates.pairs``) and refits class by class until the
thresholds settle; the expected figures are those of the replay at the final thresholds, which
is what ``detect`` with the tuned vocabulary gives. ``check`` measures that with the real
pipeline (on the fitting images, or another set: does the promise hold?).
"""

from __future__ import annotations

import dataclasses
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou, nms

from .errors import BadInput
from .vocabulary import Vocabulary

IOU = 0.5
# Refits of every class (each against the others' thresholds of the moment) before the fit
# stops; on shapes the thresholds settle in two or three.
ROUNDS = 10
# Detections collected per image: every one the per-label NMS leaves, up to max_detections
# times this (the thresholds may drop most of the best-scoring ones) and at least CANDIDATES_MIN.
CANDIDATES_PER_DETECTION = 10
CANDIDATES_MIN = 1000


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


@dataclasses.dataclass
class Candidates:
    """What the fit replays: per image, the detections before the per-class thresholds
    (``boxes_xyxy`` (N, 4) original pixels, float32 ``scores`` (N,), ``label_ids`` (N,)) and each
    class's GT boxes; ``cfg`` the deployed scoring (its agnostic NMS, ``max_detections`` and the
    ``score_threshold`` of classes without a threshold)."""

    names: list[str]
    cfg: object  # config.ScoringConfig
    images: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]]
    # Label ids past the names: boxes whose best match is a negative or a distractor. Deployment
    # thresholds them at ``cfg.score_threshold``, lets them suppress in the label-blind NMS, then
    # drops them; without them the replay kept listed boxes that ``detect`` loses.
    extra: int = 0

    def gt(self, k: int) -> int:
        return sum(len(gts[k]) for *_, gts in self.images)

    def scores(self, k: int) -> np.ndarray:
        """Every collected float32 score of class ``k``."""
        return np.concatenate([s[lab == k].numpy() for _, s, lab, _ in self.images] + [np.zeros(0, np.float32)])

    def pairs(self, thresholds: Sequence[float | None], classes: Sequence[int] | None = None) -> dict:
        """``(score, true positive)`` per class name of what deployment keeps at ``thresholds``
        (None: ``cfg.score_threshold``): the thresholds, then the agnostic NMS (default recipe,
        ``cfg.agnostic_nms``) and the best ``cfg.max_detections`` per image, as ``scoring.select``
        runs them; ``"__gt__/NAME"`` the GT counts. ``classes``: only these (indices)."""
        cfg, listed = self.cfg, len(self.names)
        thr = torch.tensor([cfg.score_threshold if t is None else float(t) for t in thresholds]
                           + [cfg.score_threshold] * self.extra, dtype=torch.float32)
        classes = range(listed) if classes is None else classes
        out: dict = {self.names[k]: [] for k in classes}
        for boxes, scores, labels, gts in self.images:
            if not any(bool((labels == k).any()) for k in classes):
                continue
            keep = torch.nonzero(scores >= thr[labels]).flatten()
            if cfg.recipe == "default" and cfg.agnostic_nms:
                keep = keep[nms(boxes[keep], scores[keep], cfg.agnostic_nms_iou)]
            else:
                keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
            keep = keep[labels[keep] < listed][: cfg.max_detections]
            for k in classes:
                mine = keep[labels[keep] == k]
                out[self.names[k]] += match(boxes[mine], scores[mine], gts[k])
        for k in classes:
            out[f"__gt__/{self.names[k]}"] = self.gt(k)
        return out


def _detect_set(predictor, coco, images_dir: str | Path, vocab: Vocabulary, batch_size: int,
                progress: Callable[[int], None] | None, **scoring) -> Iterator[tuple]:
    """Per image of ``coco`` (by id): its ``Detections`` on the CPU with ``vocab`` and
    ``scoring`` overrides, and per class of ``vocab`` its GT boxes (G, 4) xyxy (crowds left out)."""
    from .eval_protocols import gt_boxes

    names = vocab.names
    cat = {c["name"]: c["id"] for c in coco.cats.values()}
    missing = [n for n in names if n not in cat]
    if missing:
        raise BadInput(f"class {missing[0]!r} is not a category of the annotation file: calibration needs its "
                       f"ground truth (categories: {', '.join(sorted(cat)[:12])})")
    ids = sorted(coco.imgs)
    paths = [Path(images_dir) / coco.imgs[i]["file_name"] for i in ids]
    for p in predictor.stream(paths, vocab=vocab, batch_size=batch_size, **scoring):
        if p.error is not None:
            raise BadInput(f"calibration image unreadable: {p.error}")
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[ids[p.index]]))
        _, gt = gt_boxes(coco, ids[p.index])
        gt_labels = torch.tensor([a["category_id"] for a in anns if not a.get("iscrowd", 0)], dtype=torch.long)
        yield p.detections.cpu(), [gt[gt_labels == cat[n]] for n in names]
        if progress is not None:
            progress(1)


def collect(predictor, coco, images_dir: str | Path, vocab: Vocabulary, *, batch_size: int = 8,
            progress: Callable[[int], None] | None = None) -> Candidates:
    """Detect every image of ``coco`` with ``vocab`` (its thresholds set aside) at score
    threshold 0, without the agnostic NMS, keeping up to ``CANDIDATES_PER_DETECTION`` times
    ``max_detections`` per image (soft-NMS: ``max_detections``, what it runs to), and the boxes
    of the negatives and distractors (``report_extra``): the ``Candidates`` the fit replays
    deployment on."""
    cfg = predictor.scoring_config()
    cap = cfg.max_detections if cfg.soft_nms else max(CANDIDATES_MIN, CANDIDATES_PER_DETECTION * cfg.max_detections)
    free = Vocabulary(tuple(dataclasses.replace(c, threshold=None) for c in vocab.classes))
    images, extra = [], 0
    for d, gts in _detect_set(predictor, coco, images_dir, free, batch_size, progress, score_threshold=0.0,
                              agnostic_nms=False, max_detections=cap, report_extra=True):
        images.append((d.boxes_xyxy.float(), d.scores.float(), d.label_ids, gts))
        extra = max(extra, len(d.vocabulary) - len(vocab.names))
    return Candidates(vocab.names, cfg, images, extra)


def check(predictor, coco, images_dir: str | Path, vocab: Vocabulary, *, batch_size: int = 8,
          progress: Callable[[int], None] | None = None) -> list[ClassFit]:
    """Precision and recall per class of what the pipeline detects with ``vocab`` (its
    thresholds, the model's scoring: what ``detect --vocab`` gives) on a labelled set."""
    names = vocab.names
    out: dict = {n: [] for n in names} | {f"__gt__/{n}": 0 for n in names}
    for d, gts in _detect_set(predictor, coco, images_dir, vocab, batch_size, progress):
        for k, name in enumerate(names):
            mine = d.label_ids == k
            out[name] += match(d.boxes_xyxy[mine], d.scores[mine], gts[k])
            out[f"__gt__/{name}"] += len(gts[k])
    return measure(out, names, vocab.thresholds)


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
        raise BadInput(f"--target-precision must be in (0, 1], but got {precision}")
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


def fit_deployed(candidates: Candidates, precision: float | None = None, rounds: int = ROUNDS) -> list[ClassFit]:
    """``fit`` with deployment replayed (``Candidates.pairs``): first every class alone (the
    others' thresholds at 0), then each class refitted against the others' thresholds of the
    moment, until none changes (at most ``rounds`` times). Thresholds as ``written_threshold``
    gives them; precision and recall those of the replay at the final thresholds, ``reached``
    whether that precision meets the target."""
    names, n = candidates.names, len(candidates.names)
    fits = fit(candidates.pairs([0.0] * n), names, precision)
    thr = [_written(candidates, k, f.threshold) for k, f in enumerate(fits)]
    for _ in range(rounds):
        before = list(thr)
        for k in range(n):
            if thr[k] is None:  # nothing to fit: no GT or no detection at any threshold
                continue
            (f,) = fit(candidates.pairs(thr[:k] + [0.0] + thr[k + 1:], [k]), [names[k]], precision)
            thr[k] = _written(candidates, k, f.threshold)
        if thr == before:
            break
    final = measure(candidates.pairs(thr), names, thr)
    return [dataclasses.replace(m, reached=t is not None and m.precision is not None
                                and (precision is None or m.precision >= precision))
            for m, t in zip(final, thr)]


def _written(candidates: Candidates, k: int, threshold: float | None) -> float | None:
    return None if threshold is None else written_threshold(threshold, candidates.scores(k))


def written_threshold(threshold: float, scores: np.ndarray) -> float:
    """``threshold`` as the tuned file writes it: rounded down to 6 decimals (more where one of
    ``scores`` lies closer below it), so that each float32 score passes the written value
    exactly when it passes ``threshold`` (scoring compares float32 scores with float32
    thresholds). Rounding up would drop the detection the threshold was fitted at."""
    at = np.float32(threshold)
    scores = np.asarray(scores, dtype=np.float32)
    lower = scores[scores < at]
    below = lower.max() if len(lower) else -np.inf
    for digits in range(6, 10):
        written = float(Decimal(float(threshold)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_FLOOR))
        if below < np.float32(written) <= at:
            return written
    return float(at)


def tuned_file(vocab: Vocabulary, fits: Sequence[ClassFit], precision: float | None, source: dict,
               measured: Sequence[ClassFit] = ()) -> dict:
    """The tuned vocabulary file: the target and where it was fitted, the expected figures (and
    ``measured``: what the pipeline gave with these thresholds on the same images), then the
    classes with their thresholds as fitted, to the last digit (``Vocabulary.from_yaml`` reads
    it back)."""
    by_name = {f.name: f for f in fits}
    classes = Vocabulary(tuple(dataclasses.replace(c, threshold=by_name[c.name].threshold) for c in vocab.classes))
    entries = classes.to_yaml_dict()
    for name, entry in entries.items():
        if by_name[name].threshold is not None:  # to_yaml_dict rounds to 6 decimals, maybe upward
            entry["threshold"] = by_name[name].threshold
    target = {"precision": precision} if precision is not None else {"max_f1": True}
    out = {"target": target, "calibrated_on": source,
           "expected": {f.name: {"precision": _r(f.precision), "recall": _r(f.recall), "gt": f.gt,
                                 "reached": f.reached} for f in fits}}
    if measured:
        out["measured"] = {m.name: {"precision": _r(m.precision), "recall": _r(m.recall), "detections": m.detections}
                           for m in measured}
    return out | {"classes": entries}


def _r(v):
    return None if v is None else round(float(v), 4)


def run_calibrate(annotations, images, vocab: Vocabulary, out, build: Callable, *, precision: float | None = None,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None
                  ) -> tuple[list[ClassFit], list[ClassFit]]:
    """``regionclip calibrate`` as one call: checks, ``build()`` the model, fit, check the tuned
    vocabulary with the real pipeline on the same images, write ``out``. Returns (expected,
    measured) per class."""
    import yaml

    from .atomic import atomic_write_text
    from .evaluate import load_ground_truth
    from .outputs import check_output_file

    if precision is not None and not 0 < precision <= 1:
        raise BadInput(f"--target-precision must be in (0, 1], but got {precision}")
    check_output_file(out, "--out")
    coco = load_ground_truth(annotations)
    if not Path(images).is_dir():
        raise BadInput(f"images folder not found: {images}")
    model = build()
    predictor = getattr(model, "predictor", model)
    candidates = collect(predictor, coco, images, vocab, batch_size=batch_size, progress=progress)
    fits = fit_deployed(candidates, precision)
    source = {"annotations": str(annotations), "images": str(images), "image_count": len(coco.imgs),
              "iou": IOU}
    data = tuned_file(vocab, fits, precision, source)
    tuned = Vocabulary.from_dict(yaml.safe_load(yaml.safe_dump(data["classes"], sort_keys=False)),
                                 where=str(out))  # as read back
    measured = check(predictor, coco, images, tuned, batch_size=batch_size, progress=progress)
    data = tuned_file(vocab, fits, precision, source, measured)
    atomic_write_text(Path(out), yaml.safe_dump(data, sort_keys=False))
    return fits, measured
