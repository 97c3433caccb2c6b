"""Replay: a few images of the starting model's own world, labelled by the starting model itself,
trained beside the user's new images so that its own names keep being trained
(``retention.replay_images``).

- ``pseudo_label``: once, before the first step, the starting model detects its own names (the
  held-out set's categories) on ``replay_count`` images drawn from ``replay_images``; detections
  scoring at least ``replay_threshold`` become boxes of a COCO instances file, ``OUT/replay.json``.
  A resumed run reads that file back: by then the model is no longer the start.
- ``WithReplay``: the user's training set followed by the replayed images, one vocabulary (the new
  names, then the old names the new ones lack). The run's sampler shuffles both together, so a
  batch holds replayed images in proportion to their count.

Unlike distillation (``OldNamesDistill``), which keeps the old names' scores on the new images'
regions, replay shows the old names on the old world's objects, with boxes, through every loss of
the step (the proposal stage and the box head included).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..atomic import atomic_write_text
from ..data import CocoDetection
from ..detector import RegionCLIP
from ..errors import BadConfig
from ..io import expand_inputs

FILE = "replay.json"


def pseudo_label(model: RegionCLIP, images: str, names: list[str], count: int, threshold: float,
                 seed: int, batch_size: int = 8) -> dict:
    """A COCO instances dict of ``count`` images drawn (seeded) from ``images`` (a folder or glob),
    with ``model``'s detections of ``names`` scoring ``threshold`` or more as boxes (one name per
    box, ``names`` only, no distractors, class-agnostic NMS: one box per object). Images the model
    finds nothing sure in are left out: every unlabelled object of a kept image trains as
    background, so an image of only doubtful objects would teach the old names away.
    ``file_name`` entries are absolute paths (any images folder joins them to themselves)."""
    paths, problems = expand_inputs([images])
    if not paths:
        raise BadConfig(f"retention.replay_images: {problems[0] if problems else images}")
    paths = sorted(paths)
    paths = random.Random(seed).sample(paths, min(count, len(paths)))
    model.eval()
    model.text.clear()  # the run's text cache starts empty and must stay so (loop.py)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
            "info": {"description": "regionclip train: the starting model's pseudo-labels (replay)",
                     "threshold": threshold, "count": count, "seed": seed, "source": str(images)}}
    ids = {n: k + 1 for k, n in enumerate(names)}
    stream = model.predictor.stream(paths, labels=names, batch_size=batch_size, num_workers=0, top_k=1,
                                    distractors="none", score_threshold=threshold, agnostic_nms=True)
    for p in stream:
        if p.error is not None or p.detections is None or len(p.detections) == 0:
            continue
        image_id = len(coco["images"]) + 1
        h, w = p.original_size
        coco["images"].append({"id": image_id, "file_name": str(Path(p.source).resolve()), "height": h, "width": w})
        for r in p.detections.cpu().to_records(image_id=image_id, category_ids=ids):
            x, y, bw, bh = r["bbox"]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": r["category_id"], "bbox": [x, y, bw, bh],
                                        "area": bw * bh, "iscrowd": 0, "score": r["score"]})
    model.text.clear()
    return coco


def replay_set(model: RegionCLIP, cfg, names: list[str], out: Path, seed: int, resumed: bool, rank: int,
               barrier: Callable[[], None] | None, max_side: int | None, hflip_prob: float) -> CocoDetection:
    """The replayed images as a training set (``cfg``: a ``RetentionConfig``). Rank 0 labels them
    (``pseudo_label``) into ``OUT/replay.json``, unless the run resumes and the file is there;
    ``barrier`` (DDP) holds the other ranks until it is written, then every rank reads it."""
    path = out / FILE
    if rank == 0 and not (resumed and path.is_file()):
        coco = pseudo_label(model, cfg.replay_images, names, cfg.replay_count, cfg.replay_threshold, seed)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(coco) + "\n")
    if barrier is not None:
        barrier()
    replay = CocoDetection(path, "/", train=True, max_side=max_side, hflip_prob=hflip_prob)
    if len(replay) == 0:
        raise BadConfig(f"retention.replay_images: the starting model scored no box of its names at "
                        f"{cfg.replay_threshold} or more on {cfg.replay_count} images of {cfg.replay_images}: "
                        "lower retention.replay_threshold or point to images of its own world")
    return replay


class WithReplay(Dataset):
    """``new`` then ``replay`` as one training set: ``category_names`` is ``new``'s followed by
    ``replay``'s names that ``new`` lacks, and a replayed target's labels index into it. Keys are
    what ``CocoDetection`` takes (an index or ``(index, augmentation seed)``)."""

    def __init__(self, new: CocoDetection, replay: CocoDetection) -> None:
        self.new, self.replay = new, replay
        self._names = new.category_names + [n for n in replay.category_names if n not in new.category_names]
        index = {n: k for k, n in enumerate(self._names)}
        self._labels = torch.tensor([index[n] for n in replay.category_names], dtype=torch.int64)

    @property
    def category_names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self.new) + len(self.replay)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        if i < len(self.new):
            return self.new[key]
        j = i - len(self.new)
        image, target = self.replay[(j, seed) if seed is not None else j]
        return image, {**target, "labels": self._labels[target["labels"]]}
