"""How sure a run is of each box, and which images people should review first.

Per detection (``Doubt``, carried by ``Detections.doubt``; ``regionclip label`` stores them):
    * ``margin``: its score minus the best other column of its box's row in the score matrix
      ``scoring.select`` chose from: another name, a negative, a distractor. Near 0 the box could
      as well be something else; below 0 another column won the box (a ``top_k`` > 1 label).
    * ``threshold gap``: its score minus the threshold its class was held to (>= 0 when kept).
Per image:
    * ``near miss``: the doubt of the unclaimed box closest to being a detection: a proposal that no
      kept detection covers (IoU below the NMS thresholds), scoring under its class threshold, or
      above it but beaten by a negative or distractor (not one cut by ``max_detections``). An
      object the run may have missed.

From them (``box_doubt``, ``image_priority``), each in [0, 1]:
    * a detection's doubt is ``1 - min(margin, gap / (1 - threshold))``, clipped to [0, 1]: the
      smaller of how far its name is ahead of the next and how far its score is above its
      threshold, the latter as a share of the room there is above it. A box at its threshold, or tied with
      another name, has doubt 1; a box at score 1 with nothing else in its row, 0.
    * a near miss under the threshold has doubt ``1 - (threshold - score) / threshold``
      (1 at the threshold, 0 at score 0: the same rule below it); one above it, beaten by a
      negative or distractor, ``1 - (winner - score)``.
    * an image's review priority is the largest doubt among its detections and its near miss:
      the image is as doubtful as its most doubtful box (an image with no detection but a box just
      under the threshold is doubtful too). 0 for an image with neither.

Records without the figures (a ``label`` folder from before them, ``detect --json``, the ONNX
runtime) still rank: a detection's doubt is then ``1 - gap / (1 - threshold)`` with the run's
score threshold (``Results.meta["scoring"]``, else 0), margins and near misses unknown.

``most_doubtful(source, n)`` is the entry point for people and scripts: a ``label`` folder (or
``Results``) in, ``(image, priority)`` pairs out, most doubtful first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

if TYPE_CHECKING:  # records imports nothing from here; the import is for the annotations only
    from .records import ImageRecord, Results


@dataclass(frozen=True)
class Doubt:
    """The figures of one image's detections, on their device (module docstring).

    Attributes:
        margins: (N,) float, each detection's score minus the best other column of its box's row.
        threshold_gaps: (N,) float, each detection's score minus its class threshold.
        near_miss: () float, the doubt of the image's closest unclaimed box, 0 when none.
    """

    margins: torch.Tensor
    threshold_gaps: torch.Tensor
    near_miss: torch.Tensor

    def __getitem__(self, index) -> Doubt:
        """The figures of the detections ``index`` selects (the image's near miss stays)."""
        return Doubt(self.margins[index], self.threshold_gaps[index], self.near_miss)

    def cpu(self) -> Doubt:
        return Doubt(self.margins.cpu(), self.threshold_gaps.cpu(), self.near_miss.cpu())


def figures(probs: torch.Tensor, boxes_xyxy: torch.Tensor, rows: torch.Tensor, label_ids: torch.Tensor,
            scores: torch.Tensor, thresholds: torch.Tensor, class_thresholds: torch.Tensor | float,
            num_classes: int, cover_iou: float) -> Doubt:
    """The ``Doubt`` of a selection, from what the selection saw.

    ``probs`` (R, C [+ E]): the score matrix selected from, classes then negatives/distractors;
    ``boxes_xyxy`` (R, 4) its rows' boxes; ``rows``, ``label_ids``, ``scores``, ``thresholds``
    (N,): each kept detection's row, column, reported score and threshold; ``class_thresholds``
    (C,) or a float; a box overlapping a kept one at IoU >= ``cover_iou`` is claimed by it.
    Stays on the tensors' device.
    """
    probs = probs.float()
    others = probs[rows].scatter(1, label_ids[:, None], float("-inf"))
    runner_up = others.max(dim=1).values.clamp(min=0) if probs.shape[1] > 1 else torch.zeros_like(scores)
    margins = scores.float() - runner_up
    gaps = scores.float() - thresholds.float()

    # Every row's near-miss doubt, claimed rows zeroed: no branch on the values, so no wait for a GPU.
    unclaimed = torch.ones(len(probs), dtype=torch.bool, device=probs.device)
    unclaimed[rows] = False
    if len(rows):
        unclaimed &= box_iou(boxes_xyxy.float(), boxes_xyxy.float()[rows]).max(dim=1).values < cover_iou
    classes = probs[:, :num_classes]
    thr = torch.as_tensor(class_thresholds, dtype=torch.float32, device=probs.device).expand(classes.shape[1])
    best = (classes - thr).max(dim=1).indices if len(probs) else torch.zeros(0, dtype=torch.long, device=probs.device)
    s, t = classes.gather(1, best[:, None])[:, 0], thr[best]
    winner = probs.max(dim=1).values if len(probs) else s
    below = 1 - (t - s) / t.clamp(min=1e-6)
    # A box whose class won its row above the threshold was cut by max_detections, behind
    # surer ones: not a miss. One beaten by a negative or distractor is.
    beaten = torch.where(winner > s, 1 - (winner - s), torch.zeros_like(s))
    doubt = torch.where(s < t, below, beaten).clamp(0, 1) * unclaimed
    near = doubt.max() if len(probs) else probs.new_zeros(())
    return Doubt(margins, gaps, near)


def box_doubt(scores, margins=None, threshold_gaps=None, threshold: float = 0.0) -> np.ndarray:
    """(N,) doubt in [0, 1] of detections with ``scores`` (N,) and their figures (module docstring);
    without ``threshold_gaps`` the gap is measured to ``threshold``, without ``margins`` only the gap counts."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    gaps = scores - threshold if threshold_gaps is None else np.asarray(threshold_gaps, np.float64).reshape(-1)
    room = np.maximum(1.0 - (scores - gaps), 1e-6)  # 1 - the detection's threshold
    sure = gaps / room
    if margins is not None:
        sure = np.minimum(sure, np.asarray(margins, np.float64).reshape(-1))
    return 1.0 - np.clip(sure, 0.0, 1.0)


def image_priority(scores, margins=None, threshold_gaps=None, near_miss: float | None = None,
                   threshold: float = 0.0) -> float:
    """An image's review priority in [0, 1]: the largest of its detections' ``box_doubt`` and its
    ``near_miss`` (module docstring); 0 for an image with neither."""
    doubts = box_doubt(scores, margins, threshold_gaps, threshold)
    return float(max(doubts.max(initial=0.0), near_miss or 0.0))


def detections_priority(d) -> float | None:
    """The review priority of one image's ``Detections`` from its figures; None where the
    backend gave none (the ONNX runtime)."""
    if d.doubt is None:
        return None
    f = d.doubt.cpu()
    return image_priority(d.scores.float().cpu().numpy(), f.margins.float().numpy(), f.threshold_gaps.float().numpy(),
                          float(f.near_miss))


def run_threshold(results: Results) -> float:
    """The score threshold a run used (its manifest's scoring), 0 when it did not record one."""
    scoring = results.meta.get("scoring") if isinstance(results.meta, dict) else None
    value = scoring.get("score_threshold") if isinstance(scoring, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.0


def priority_of(record: ImageRecord, threshold: float = 0.0) -> float:
    """``record``'s review priority: the one ``label`` stored, else computed from what it has."""
    if record.priority is not None:
        return float(record.priority)
    return image_priority(record.scores, record.margins, record.threshold_gaps, record.near_miss, threshold)


def ranked(results: Results) -> list[tuple[ImageRecord, float]]:
    """The decodable images of ``results`` with their priorities, most doubtful first (ties in run order)."""
    threshold = run_threshold(results)
    scored = [(r, priority_of(r, threshold)) for r in results.images if r.error is None]
    return sorted(scored, key=lambda pair: -pair[1])  # sorted is stable: ties keep the run's order


def most_doubtful(source: str | os.PathLike | Results, n: int | None = None) -> list[tuple[str, float]]:
    """``(image, priority)`` of the ``n`` most doubtful images (all with ``n`` None), most doubtful
    first; ``image`` as the run wrote it. ``source``: a ``regionclip label --out`` folder, a
    ``detect --json`` file, or ``Results``. Undecodable images are left out."""
    from .records import Results, load_results

    results = source if isinstance(source, Results) else load_results(source)
    pairs = [(r.image, p) for r, p in ranked(results)]
    return pairs if n is None else pairs[: max(0, int(n))]


def reorder(results: Results, n: int | None) -> Results:
    """``results`` with its decodable images most doubtful first, the ``n`` first only (all with None)."""
    from dataclasses import replace

    records = [r for r, _ in ranked(results)]
    return replace(results, images=records if n is None else records[: max(0, int(n))])


__all__: Sequence[str] = ("Doubt", "box_doubt", "figures", "image_priority", "most_doubtful", "priority_of", "ranked",
                          "reorder", "run_threshold")
