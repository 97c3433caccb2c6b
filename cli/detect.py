"""``regionclip detect``: label boxes in images with any vocabulary."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.errors import BadAnnotations, BadImage, BadInput
from regionclip.labels import read_label_lines

from . import options as O
from .render import console, progress, warn


def read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    items: list[str] = []
    if labels:
        items += labels.split(",")
    if labels_file is not None:
        items += read_label_lines(labels_file)
    items = [s.strip() for s in items if s.strip()]
    if not items and (labels is not None or labels_file is not None):
        raise BadInput('no labels given: pass --labels "dog,cat" or --labels-file vocab.txt (one per line)')
    return list(dict.fromkeys(items))


@O.with_model_flags()
def detect(
    inputs: Annotated[list[str], typer.Argument(help="Image files, directories or glob patterns.", show_default=False)],
    labels: Annotated[Optional[str], typer.Option("--labels", "-l", help='Comma-separated vocabulary, e.g. "dog,cat,bicycle".',
                                                  show_default=False)] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="Vocabulary file, one label per line.", show_default=False)] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help=(
        "Write COCO results records here: bbox (x, y, width, height), score, category_id, image_id, plus label and image. "
        "Without --annotations, image_id is the image's 0-based position in the run's input order and "
        "category_id its label's 1-based position in the vocabulary."), show_default=False)] = None,
    annotations: Annotated[Optional[Path], typer.Option(help=(
        "COCO ground truth the images belong to: --json then carries its image ids (matched by file_name) and "
        "category ids (matched by name; other labels are left out), ready for eval --results. Without "
        "--labels the vocabulary is its categories."), show_default=False)] = None,
    save_dir: Annotated[Optional[Path], typer.Option(help=(
        "Write annotated copies here, mirroring the inputs' folders below their common parent; the "
        "extension is kept (unusual ones get .jpg appended)."), show_default=False)] = None,
    score_threshold: O.ScoreThreshold = None,
    max_detections: O.MaxDetections = None,
    nms_iou: O.NmsIou = None,
    top_k: O.TopK = None,
    agnostic_nms: O.AgnosticNms = None,
    batch_size: O.BatchSize = 8,
    text_embeddings: O.TextEmbeddings = None,
    flags: O.ModelFlags = None,
) -> None:
    """Detect objects named by --labels in images; print a table, optionally write JSON and annotated images.

    Every argument and output path is checked before the model is built. Exits non-zero if any
    input could not be read (the others are still processed).
    """
    from regionclip.config import check_scoring
    from regionclip.io import expand_inputs
    from regionclip.outputs import annotated_paths, atomic_write_text, check_output_dir, check_output_file, relative_paths
    from regionclip.results import dumps_records

    scoring = O.check_scoring_flags(score_threshold=score_threshold, max_detections=max_detections, nms_iou=nms_iou,
                                    top_k=top_k, agnostic_nms=agnostic_nms)
    O.check_positive("--batch-size", batch_size)
    if json_out is not None:
        check_output_file(json_out, "--json")
    if save_dir is not None:
        check_output_dir(save_dir, "--save-dir")
    vocab = read_labels(labels, labels_file)
    paths, problems = expand_inputs(inputs)
    if not paths:
        raise BadImage("no images to process: " + "; ".join(problems))
    targets = annotated_paths(paths, save_dir) if save_dir is not None else None
    vocab, image_ids, category_ids = _ids(annotations, paths, vocab)
    emb = O.read_text_embeddings(text_embeddings, vocab)
    export_dir = _onnx_export(flags)
    if export_dir is None:
        cfg = O.resolve_config(flags)
        check_scoring(dataclasses.replace(cfg.scoring, **scoring))  # the preset's and --set scoring.* values too
    for p in problems:
        warn(p)
    net = O.build_model(cfg) if export_dir is None else _onnx_model(export_dir, flags.device, scoring)
    records, failed = _run(net, paths, vocab, batch_size, {**scoring, "text_embeddings": emb},
                           image_ids, category_ids, targets, relative_paths(paths)[1])
    console.print(f"{len(records)} detections in {len(paths) - failed} image(s)")
    if json_out is not None:
        atomic_write_text(json_out, dumps_records(records))
        console.print(f"wrote {json_out}")
    if save_dir is not None:
        console.print(f"annotated images in {save_dir}/")
    if failed or problems:
        raise typer.Exit(code=3)


def _onnx_export(flags: O.ModelFlags) -> Path | None:
    """``--model DIR`` (an ONNX export, run by onnxruntime) -> DIR; flags the export fixed are
    refused. None for presets and YAML files; a preset's name wins over a folder of that name
    unless the folder holds an export's manifest."""
    from regionclip.config import model_preset_path
    from regionclip.onnx.manifest import is_export_dir

    folder = Path(flags.model)
    if not is_export_dir(folder) and (not folder.is_dir() or model_preset_path(flags.model) is not None):
        return None
    fixed = {"--clip-model": flags.clip_model, "--clip-pretrained": flags.clip_pretrained, "--detector": flags.detector,
             "--detector-weights": flags.detector_weights, "--mode": flags.mode, "--precision": flags.precision,
             "--set": flags.set_, "--text-cache": flags.text_cache}
    given = [flag for flag, value in fixed.items() if value]
    if given:
        raise BadInput(f"{given[0]} does not apply to the ONNX export {flags.model}: leave it out (model options "
                       "are set when exporting: regionclip export ... --out DIR)")
    return Path(flags.model)


def _onnx_model(folder: Path, device: str | None, scoring: dict):
    from regionclip.onnx import OnnxDetector

    net = OnnxDetector(folder, device=device or "cpu")
    net.scoring_config(**scoring)  # the export's scoring with the flags, checked before any image runs
    return net


def _ids(annotations: Path | None, paths: list[Path], vocab: list[str]) -> tuple[list[str], list[int], dict | None]:
    """(vocabulary, image ids, label -> category id): from the ground truth when given, else positions."""
    if annotations is None:
        if not vocab:
            raise BadInput('no labels given: pass --labels "dog,cat" or --labels-file vocab.txt (one per line)')
        return vocab, list(range(len(paths))), None
    from regionclip.evaluate import load_ground_truth
    from regionclip.results import category_ids_for, image_ids_for

    gt = load_ground_truth(annotations)
    vocab = vocab or [c["name"] for c in gt.cats.values()]
    image_ids = image_ids_for(gt, paths)
    category_ids, missing = category_ids_for(gt, vocab)
    if not category_ids:
        raise BadAnnotations(f"none of the labels is a category of {annotations}; use its category names")
    if missing:
        warn(f"{len(missing)} label(s) are not categories of {annotations} and are left out of --json "
             f"(first: {missing[0]!r})")
    return vocab, image_ids, category_ids


def _run(net, paths, vocab, batch_size, detect_kwargs, image_ids, category_ids, targets, shown):
    """Detect; print the detections and a per-image table. Returns (records, failed images)."""
    from regionclip.runner import iter_detect
    from regionclip.visualize import save_annotated

    records, failed = [], 0
    table = Table("image", "label", "score", "box (x1, y1, x2, y2)")
    per_image = Table("image", "size", "detections", "ms (batch mean)")
    with progress(transient=True) as bar:
        task = bar.add_task("detecting", total=len(paths))
        for i, r in enumerate(iter_detect(net, paths, vocab, batch_size, **detect_kwargs)):
            bar.advance(task)
            if r.error:
                warn(r.error)
                failed += 1
                continue
            d = r.detections
            records += d.to_records(image=str(r.path), image_id=image_ids[i], category_ids=category_ids)
            for name, score, box in zip(d.names, d.scores.tolist(), d.boxes_xyxy.tolist()):
                table.add_row(str(shown[i]), name, f"{score:.3f}", ", ".join(f"{v:.1f}" for v in box))
            (h, w) = r.original_size
            per_image.add_row(str(shown[i]), f"{w}x{h}", str(len(d)), f"{r.seconds * 1000:.0f}")
            if targets is not None:
                save_annotated(targets[i], *r.for_drawing())
    console.print(table)
    console.print(per_image)
    return records, failed
