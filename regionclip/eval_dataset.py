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

from .detector import RegionCLIP
from .errors import BadAnnotations, BadImage, BadInput
from .eval_protocols import gt_box_accuracy, gt_box_records, gt_boxes
from .evaluate import check_split, coco_map
from .recall import ProposalRecall

Progress = Callable[[int], None]


def _shard(ids: list[int], batch_size: int, shard: tuple[int, int]) -> list[int]:
    """Process ``rank``'s share of ``ids`` in whole batches (every ``world``-th), so each batch,
    and with it its padding, is the one a single process would run."""
    rank, world = shard
    chunks = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    return [i for chunk in chunks[rank::world] for i in chunk]


def _size_matches(coco, image_id: int, original_size: tuple[int, int]) -> bool:
    """Whether a decoded image has the (height, width) its ground-truth entry gives (True when
    the entry gives none): a file of the right name from another set has another size."""
    img = coco.imgs[image_id]
    h, w = img.get("height"), img.get("width")
    return h is None or w is None or (int(h), int(w)) == tuple(original_size)


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
    vocab=None,
    distractors=None,
    short_lists: tuple[int, int, int] | None = None,
    tiling: dict | None = None,
) -> tuple[dict, list[dict]]:
    """Run ``model`` over every image of ``coco`` (a pycocotools COCO) and score it.

    Returns ``(report, records)``: the report holds the figures in percent (``map``; with
    ``proposals="gt"`` also ``accuracy``) and the settings; ``records`` are the COCO results.
    Missing or unreadable images are skipped and counted in ``report["images_skipped"]``.
    ``workers`` DataLoader processes decode images while the model runs (0: in this process).
    ``shard=(rank, world)`` runs every ``world``-th batch from ``rank``; ``gather`` (e.g. an
    ``all_gather_object``) then collects every process's part, and all score the whole set.
    ``text_embeddings`` (a tensor or concept-embedding file, one row per vocabulary label, in
    order) replaces encoding the vocabulary (``RegionCLIP.vocabulary``). ``vocab`` (a
    ``vocabulary.Vocabulary``) replaces ``vocabulary``: its classes, compiled once.
    ``distractors`` as ``Predictor.stream`` takes them (None: the model's own). ``short_lists``
    ``(count, size, seed)`` adds ``report["short_lists"]`` (``shortlists.evaluate_short_lists``:
    seeded lists of ``size`` names from the vocabulary, each detected alone), a second pass.
    ``tiling`` (``{"tile": pixels, "tile_overlap": share}``): detect by tiles (``Predictor.stream``);
    proposal recall then counts every window's proposals, best objectness first.
    """
    if proposals not in ("model", "gt"):
        raise BadInput(f"unknown proposals '{proposals}': use model or gt")
    if tiling and proposals == "gt":
        raise BadInput("tiles are for detecting with proposals; the GT-box protocol (proposals 'gt') classifies "
                       "the given boxes in the whole image: leave out one of them")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise BadImage(f"images folder not found: {images_dir}")
    if int(batch_size) < 1 or int(workers) < 0 or int(top_k) < 1:
        raise BadInput(f"batch_size and top_k must be at least 1 and workers at least 0, "
                       f"but got {batch_size}, {top_k} and {workers}")
    if vocab is not None:
        vocabulary = vocab.names
    labels, ids = vocabulary_for(coco, vocabulary)
    if split is not None:
        check_split(coco, split, labels)  # a wrong split fails now, not after inference
    named = {"vocab": vocab} if vocab is not None else {"labels": labels}
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
    predictor = getattr(model, "predictor", model)
    ids_run = _shard(sorted(coco.imgs), batch_size, shard)
    paths = [images_dir / coco.imgs[i]["file_name"] for i in ids_run]
    if proposals == "model":
        # Each label keeps its own ranking for mAP: no cross-label (agnostic) suppression.
        results = predictor.stream(paths, **named, text_embeddings=text_embeddings, batch_size=batch_size,
                                   num_workers=workers, proposals=True, top_k=top_k, score_threshold=threshold,
                                   agnostic_nms=False, max_detections=COCO_MAX_DETECTIONS, distractors=distractors,
                                   **(tiling or {}))
    else:
        gts = {i: gt_boxes(coco, i) for i in ids_run}
        results = predictor.iter_classify(paths, named.get("labels"), [gts[i][1] for i in ids_run],
                                          text_embeddings=text_embeddings, batch_size=batch_size, num_workers=workers,
                                          vocab=vocab)
    mismatched: list[str] = []
    for p in results:
        image_id = ids_run[p.index]
        if p.error is not None:
            skipped.append(p.error)
        else:
            if not _size_matches(coco, image_id, p.original_size):
                mismatched.append(coco.imgs[image_id]["file_name"])
            if proposals == "model":
                recall.add(image_id, *p.proposals)
                d = p.detections.cpu()
                d = d[torch.tensor([n in ids for n in d.names], dtype=torch.bool)]  # names outside the file
                records += d.to_records(image_id=image_id, category_ids=ids)
            else:
                scores[image_id], ann_ids[image_id] = p.probabilities.cpu(), gts[image_id][0]
            images += 1
        if progress:
            progress(1)
    seconds = time.perf_counter() - start
    if gather is not None:
        parts = gather((records, scores, ann_ids, images, skipped, recall, mismatched))
        records = [r for part in parts for r in part[0]]
        scores = {k: v for part in parts for k, v in part[1].items()}
        ann_ids = {k: v for part in parts for k, v in part[2].items()}
        images = sum(part[3] for part in parts)
        skipped = [m for part in parts for m in part[4]]
        mismatched = [m for part in parts for m in part[6]]
        if recall is not None:
            recall = parts[0][5]
            for part in parts[1:]:
                recall.merge(part[5])
    if images == 0:
        raise BadImage(f"none of the {len(coco.imgs)} images could be read from {images_dir} ({skipped[0] if skipped else 'no images'})")
    if mismatched and len(mismatched) == images:
        raise BadAnnotations(
            f"none of the {images} images read from {images_dir} has the size the annotation file gives it "
            f"(first: {mismatched[0]}): these are other images of the same names; pass the folder the "
            "annotation file describes")
    report: dict = {}
    if proposals == "gt":
        report["accuracy"] = gt_box_accuracy(coco, scores, ann_ids, category_ids, split)
        records = gt_box_records(coco, scores, ann_ids, category_ids, top_k=top_k)
    report["map"] = coco_map(coco, records, split)
    if recall is not None:
        # Class-agnostic: what the proposal stage hands the region classifier (regionclip/recall.py).
        report["proposal_recall"] = recall.summary()
    if short_lists is not None:
        if gather is not None and shard[1] > 1:
            raise BadInput("short-list evaluation runs in one process; leave out the short lists under several ranks")
        from .shortlists import evaluate_short_lists, pick_lists

        count, size, seed = short_lists
        lists = pick_lists(labels, size, count, seed)
        report["short_lists"] = evaluate_short_lists(predictor, coco, paths, ids_run, labels, lists,
                                                     distractors=distractors, batch_size=batch_size, workers=workers,
                                                     progress=progress, tiling=tiling)
    if vocab is not None:
        report["vocabulary"] = vocab.to_manifest()  # what reproduces the run
    report["settings"] = {
        "model": model.cfg.name, "clip_model": model.cfg.clip_model, "detector": model.cfg.detector,
        "mode": model.cfg.mode, "proposals": proposals, "vocabulary_size": len(labels), "top_k": top_k,
        "max_detections": COCO_MAX_DETECTIONS if proposals == "model" else None,
        "images": images, "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 3),
        "device": str(model.device), "precision": model.cfg.precision,
        **({"tiles": dict(tiling)} if tiling else {}),
    }
    report["images_skipped"] = len(skipped)
    report["skipped"] = skipped
    report["images_mismatched"] = len(mismatched)  # read, but not the size the ground truth gives them
    return report, records


def evaluate_results(coco, records: list[dict], split: dict[str, list[str]] | None = None) -> dict:
    """Score an existing COCO results list (no model).

    Records naming an ``image`` file that exists are checked against the ground truth's size
    for it: when none of those images has it, they are other images of the same names and
    ``BadAnnotations`` says so; ``report["images_mismatched"]`` counts the images that differ.
    """
    if not isinstance(records, list):
        raise BadAnnotations("results must be a JSON list of COCO detection records")
    checked, mismatched = _check_result_images(coco, records)
    if checked and len(mismatched) == checked:
        raise BadAnnotations(
            f"none of the {checked} images the results name has the size the annotation file gives it "
            f"(first: {mismatched[0]}): they were detected in other images of the same names; score them "
            "against the annotation file of those images")
    return {"map": coco_map(coco, records, split), "settings": {"results": len(records)},
            "images_mismatched": len(mismatched)}


def _check_result_images(coco, records: list) -> tuple[int, list[str]]:
    """(image files checked, those whose size differs from their ground-truth entry's): records
    with an ``image`` path that exists and matches a ``file_name`` (header reads only)."""
    from PIL import Image

    from .results import ImageIndex

    index, seen, checked, mismatched = ImageIndex(coco), set(), 0, []
    for rec in records:
        path = rec.get("image") if isinstance(rec, dict) else None
        if not isinstance(path, str) or path in seen:
            continue
        seen.add(path)
        image_id = index.lookup(path)
        if image_id is None or not Path(path).is_file():
            continue
        try:
            with Image.open(path) as im:
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: shown rotated
                    w, h = h, w
        except OSError:
            continue
        checked += 1
        if not _size_matches(coco, image_id, (h, w)):
            mismatched.append(path)
    return checked, mismatched


def run_eval(
    annotations: str | Path,
    build: Callable[[], RegionCLIP] | None = None,
    *,
    images: str | Path | None = None,
    results: str | Path | None = None,
    split: str | Path | None = None,
    vocabulary: Sequence[str] | None = None,
    proposals: str = "model",
    top_k: int = 3,
    batch_size: int = 8,
    text_embeddings=None,
    report_out: str | Path | None = None,
    results_out: str | Path | None = None,
    progress: Progress | None = None,
    total: Callable[[int], None] | None = None,
    vocab=None,
    distractors=None,
    short_lists: tuple[int, int, int] | None = None,
    tiling: dict | None = None,
) -> dict:
    """``regionclip eval`` as one call: score ``results`` (a COCO results JSON), or run the model
    ``build()`` returns over ``images`` (``evaluate_model``); write ``report_out`` / ``results_out``.

    Every argument, output path, the split and the embeddings' count are checked before
    ``build`` is called. ``vocab`` (a checked ``vocabulary.Vocabulary``) replaces ``vocabulary``. ``total(n)`` is told the number of images before they run.
    ``distractors`` and ``short_lists`` as ``evaluate_model`` takes them (short lists: a second pass,
    counted in ``total``). ``tiling`` as ``evaluate_model`` takes it.
    """
    import json

    from .data.splits import load_split
    from .evaluate import load_ground_truth, write_report
    from .outputs import atomic_write_json, check_output_file

    if proposals not in ("model", "gt"):
        raise BadInput(f"--proposals must be 'model' or 'gt', but got {proposals!r}")
    if tiling and results is not None:
        raise BadInput("--tile is for running a model (--images), not for scoring --results")
    if tiling and proposals == "gt":
        raise BadInput("--tile is for detecting with proposals; --proposals gt classifies the given boxes in the "
                       "whole image: leave out one of them")
    for path, flag in ((report_out, "--json"), (results_out, "--results-out")):
        if path is not None:
            check_output_file(path, flag)
    gt = load_ground_truth(annotations)
    if vocab is not None:
        if results is not None:
            raise BadInput("--vocab and --exemplar are for running a model (--images), not for scoring --results")
        vocabulary = vocab.names
    if short_lists is not None:
        from .shortlists import pick_lists

        if results is not None:
            raise BadInput("--short-lists runs the model with each list (--images), it cannot score --results")
        if text_embeddings is not None or vocab is not None:
            raise BadInput("--short-lists draws plain names from the vocabulary: leave out --text-embeddings, "
                           "--vocab and --exemplar")
        pick_lists(vocabulary_for(gt, vocabulary)[0], short_lists[1], short_lists[0], short_lists[2])  # checked now
    if distractors is not None:
        from .distractors import check_spec

        check_spec(distractors)
    parts = load_split(split) if split is not None else None
    if parts is not None:
        check_split(gt, parts, vocabulary if results is None else None)
    if results is not None:
        if text_embeddings is not None:
            raise BadInput("--text-embeddings is for running a model (--images), not for scoring --results")
        results = Path(results)
        if not results.is_file():
            raise BadAnnotations(f"results file not found: {results}")
        try:
            records = json.loads(results.read_text())
        except json.JSONDecodeError as exc:
            raise BadAnnotations(f"{results}: not valid JSON ({exc.msg})") from None
        report = evaluate_results(gt, records, parts)
    else:
        if text_embeddings is not None:
            from .vocabulary import concept_vocabulary

            text_embeddings = concept_vocabulary(text_embeddings, vocabulary_for(gt, vocabulary)[0])
        if images is None:
            raise BadInput("pass --images FOLDER to run a model, or --results FILE to score existing results")
        if not Path(images).is_dir():
            raise BadImage(f"images folder not found: {images}")
        model = build()
        if total is not None:
            total(len(gt.imgs) * (2 if short_lists is not None else 1))
        report, records = evaluate_model(model, gt, images, split=parts, vocabulary=vocabulary, proposals=proposals,
                                         top_k=top_k, batch_size=batch_size, text_embeddings=text_embeddings,
                                         progress=progress, vocab=vocab, distractors=distractors,
                                         short_lists=short_lists, tiling=tiling)
        if results_out is not None:
            atomic_write_json(results_out, records, indent=None)
    if report_out is not None:
        write_report(report, report_out)
    return report
