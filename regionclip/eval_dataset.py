"""``regionclip eval`` as a library call: run a model over a COCO-format set and score it.

Two protocols: ``proposals="model"`` detects the vocabulary and scores the results with COCO
mAP; ``proposals="gt"`` classifies every ground-truth box (top-1/top-5 accuracy and the mAP of
the labelled boxes), which isolates region-text matching from proposal quality.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .detector import RegionCLIP
from .errors import BadAnnotations, BadImage, BadInput
from .eval_protocols import gt_box_accuracy, gt_box_records, gt_boxes
from .evaluate import check_split, coco_map
from .io import load_reduced
from .recall import ProposalRecall

Progress = Callable[[int], None]


class _Images(Dataset):
    """The images of a COCO file, decoded at the model's resolution (in DataLoader workers, so
    decoding overlaps inference). An unreadable file yields its error instead of pixels."""

    def __init__(self, coco, images_dir: Path, max_side: int | None, ids: Sequence[int]):
        self.coco, self.images_dir, self.max_side = coco, images_dir, max_side
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image_id = self.ids[i]
        try:
            return image_id, load_reduced(self.images_dir / self.coco.imgs[image_id]["file_name"], self.max_side), None
        except BadImage as exc:
            return image_id, None, str(exc)


def _as_list(items: list) -> list:
    return items


def _shard(ids: list[int], batch_size: int, shard: tuple[int, int]) -> list[int]:
    """Process ``rank``'s share of ``ids`` in whole batches (every ``world``-th), so each batch,
    and with it its padding, is the one a single process would run."""
    rank, world = shard
    chunks = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    return [i for chunk in chunks[rank::world] for i in chunk]


def _batches(coco, images_dir: Path, model: RegionCLIP, batch_size: int, workers: int, skipped: list[str],
             shard: tuple[int, int] = (0, 1)):
    """Yield lists of (image id, LoadedImage); unreadable or missing files go to ``skipped``."""
    ids = _shard(sorted(coco.imgs), batch_size, shard)
    loader = DataLoader(_Images(coco, images_dir, model.input_max_side, ids), batch_size=batch_size,
                        num_workers=workers, collate_fn=_as_list, pin_memory=model.device.type == "cuda")
    for items in loader:
        skipped += [error for _, _, error in items if error is not None]
        good = [(image_id, loaded) for image_id, loaded, error in items if error is None]
        if good:
            yield good


def vocabulary_for(coco, vocabulary: Sequence[str] | None) -> tuple[list[str], dict[str, int]]:
    """The label list (the file's category names unless given) and name -> COCO id for the known ones."""
    names = {c["name"]: c["id"] for c in coco.cats.values()}
    labels = list(dict.fromkeys(vocabulary)) if vocabulary else [c["name"] for c in coco.cats.values()]
    if not labels:
        raise BadInput("the vocabulary is empty: the annotation file has no categories; pass a vocabulary (--vocabulary)")
    return labels, {n: names[n] for n in labels if n in names}


# COCO's AP is taken over at most 100 detections per image (COCOeval's largest maxDets). A model's
# own max_detections is a display cap for `detect` and must not cut an evaluation short.
COCO_MAX_DETECTIONS = 100


def evaluate_model(
    model: RegionCLIP,
    coco,
    images_dir: str | Path,
    *,
    split: dict[str, list[str]] | None = None,
    vocabulary: Sequence[str] | None = None,
    proposals: str = "model",
    top_k: int = 3,
    batch_size: int = 8,
    workers: int = 2,
    progress: Progress | None = None,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[object], list] | None = None,
    text_embeddings=None,
) -> tuple[dict, list[dict]]:
    """Run ``model`` over every image of ``coco`` (a pycocotools COCO) and score it.

    Returns ``(report, records)``: the report holds the figures in percent (``map``; with
    ``proposals="gt"`` also ``accuracy``) and the settings; ``records`` are the COCO results.
    Missing or unreadable images are skipped and counted in ``report["images_skipped"]``.
    ``workers`` DataLoader processes decode images while the model runs (0: in this process).
    ``shard=(rank, world)`` runs every ``world``-th batch from ``rank``; ``gather`` (e.g. an
    ``all_gather_object``) then collects every process's part, and all score the whole set.
    ``text_embeddings`` (a tensor or concept-embedding file, one row per vocabulary label, in
    order) replaces encoding the vocabulary (``RegionCLIP.vocabulary``).
    """
    if proposals not in ("model", "gt"):
        raise BadInput(f"unknown proposals '{proposals}': use model or gt")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise BadImage(f"images folder not found: {images_dir}")
    if int(batch_size) < 1 or int(workers) < 0 or int(top_k) < 1:
        raise BadInput(f"batch_size and top_k must be at least 1 and workers at least 0, "
                       f"but got {batch_size}, {top_k} and {workers}")
    labels, ids = vocabulary_for(coco, vocabulary)
    if split is not None:
        check_split(coco, split, labels)  # a wrong split fails now, not after inference
    if text_embeddings is not None:
        labels, text_embeddings = model.vocabulary(labels, text_embeddings)  # checked now, loaded once
    # RegionCLIP's recipe is scored as RegionCLIP evaluates it (its own threshold, 0.001): ranking
    # every box x label pair would be ~65,000 pairs per image through (soft-)NMS.
    threshold = None if model.cfg.scoring.recipe == "regionclip" else 0.0
    skipped: list[str] = []
    records: list[dict] = []
    recall = ProposalRecall(coco, split) if proposals == "model" else None
    scores, ann_ids = {}, {}
    images, start = 0, time.perf_counter()
    if proposals == "gt":
        missing = [c["name"] for c in coco.cats.values() if c["name"] not in ids]
        if missing:
            raise BadInput(f"the GT-box protocol (proposals 'gt') classifies over the file's categories; "
                           f"the vocabulary lacks {missing[0]!r}")
        category_ids = [ids[n] for n in labels]
    for batch in _batches(coco, images_dir, model, batch_size, workers, skipped, shard):
        pixels = [loaded for _, loaded in batch]
        if proposals == "model":
            # Each label keeps its own ranking for mAP: no cross-label (agnostic) suppression.
            found: list = []
            dets = model.detect(pixels, labels, top_k=top_k, score_threshold=threshold, agnostic_nms=False,
                                max_detections=COCO_MAX_DETECTIONS, batch_size=batch_size,
                                text_embeddings=text_embeddings, proposals_out=found)
            for (image_id, _), d, (boxes, objectness) in zip(batch, dets, found):
                recall.add(image_id, boxes, objectness)
                d = d.cpu()
                d = d[torch.tensor([n in ids for n in d.names], dtype=torch.bool)]  # names outside the file
                records += d.to_records(image_id=image_id, category_ids=ids)
        else:
            gts = [gt_boxes(coco, image_id) for image_id, _ in batch]
            probs = model.classify(pixels, labels, [b for _, b in gts], batch_size=batch_size,
                                   text_embeddings=text_embeddings)
            for (image_id, _), (a_ids, _), p in zip(batch, gts, probs):
                scores[image_id], ann_ids[image_id] = p.cpu(), a_ids
        images += len(batch)
        if progress:
            progress(len(batch))
    seconds = time.perf_counter() - start
    if gather is not None:
        parts = gather((records, scores, ann_ids, images, skipped, recall))
        records = [r for part in parts for r in part[0]]
        scores = {k: v for part in parts for k, v in part[1].items()}
        ann_ids = {k: v for part in parts for k, v in part[2].items()}
        images = sum(part[3] for part in parts)
        skipped = [m for part in parts for m in part[4]]
        if recall is not None:
            recall = parts[0][5]
            for part in parts[1:]:
                recall.merge(part[5])
    if images == 0:
        raise BadImage(f"none of the {len(coco.imgs)} images could be read from {images_dir} ({skipped[0] if skipped else 'no images'})")
    report: dict = {}
    if proposals == "gt":
        report["accuracy"] = gt_box_accuracy(coco, scores, ann_ids, category_ids, split)
        records = gt_box_records(coco, scores, ann_ids, category_ids, top_k=top_k)
    report["map"] = coco_map(coco, records, split)
    if recall is not None:
        # Class-agnostic: what the proposal stage hands the region classifier (regionclip/recall.py).
        report["proposal_recall"] = recall.summary()
    report["settings"] = {
        "model": model.cfg.name, "clip_model": model.cfg.clip_model, "detector": model.cfg.detector,
        "mode": model.cfg.mode, "proposals": proposals, "vocabulary_size": len(labels), "top_k": top_k,
        "max_detections": COCO_MAX_DETECTIONS if proposals == "model" else None,
        "images": images, "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 3),
        "device": str(model.device), "precision": model.cfg.precision,
    }
    report["images_skipped"] = len(skipped)
    report["skipped"] = skipped
    return report, records


def evaluate_results(coco, records: list[dict], split: dict[str, list[str]] | None = None) -> dict:
    """Score an existing COCO results list (no model)."""
    if not isinstance(records, list):
        raise BadAnnotations("results must be a JSON list of COCO detection records")
    return {"map": coco_map(coco, records, split), "settings": {"results": len(records)}}
