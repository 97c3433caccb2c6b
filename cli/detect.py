"""``regionclip detect``: label boxes in images with any vocabulary."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.errors import BadInput
from regionclip.labels import read_label_lines

from . import options as O
from .render import console, err_console, progress, warn


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
    workers: Annotated[int, typer.Option(help="Processes decoding images ahead of the model (0: decode in this one).")] = 2,
    text_embeddings: O.TextEmbeddings = None,
    vocab_file: O.VocabFile = None,
    exemplar: O.Exemplar = None,
    distractors: O.Distractors = None,
    tile: O.Tile = None,
    tile_overlap: O.TileOverlap = None,
    flags: O.ModelFlags = None,
) -> None:
    """Detect objects named by --labels in images; print a table, optionally write JSON and annotated images.

    Every argument and output path is checked before the model is built. Exits non-zero if any
    input could not be read (the others are still processed); on Ctrl-C the images done are
    kept (--json holds their records) and it exits 130.
    """
    from regionclip.jobs import detect_files

    scoring = O.check_scoring_flags(score_threshold=score_threshold, max_detections=max_detections, nms_iou=nms_iou,
                                    top_k=top_k, agnostic_nms=agnostic_nms)
    O.check_positive("--batch-size", batch_size)
    O.check_distractors(distractors)
    tiling = O.check_tile(tile, tile_overlap)
    vocab = read_labels(labels, labels_file)
    classes = O.resolve_vocab(vocab, vocab_file, exemplar)  # None: plain labels
    export_dir = _onnx_export(flags)
    if not vocab and annotations is None and classes is None:
        vocab = _model_labels(flags, export_dir)  # a model trained on a closed set names its own

    def before_run(summary) -> None:  # every check passed: the last cheap ones, then the warnings
        if export_dir is None:
            from regionclip.config import check_scoring

            cfg = O.resolve_config(flags)
            check_scoring(dataclasses.replace(cfg.scoring, **scoring))  # the preset's and --set scoring.* values too
        for line in summary.warnings + summary.problems:
            warn(line)
        shown.start(summary.images)

    def build():
        return _onnx_model(export_dir, flags.device, scoring) if export_dir is not None else O.build_model(flags)

    with progress(transient=True) as bar:
        shown = _Shown(bar)
        summary = detect_files(inputs, vocab, build, annotations=annotations, json_out=json_out, save_dir=save_dir,
                               text_embeddings=text_embeddings, batch_size=batch_size, num_workers=workers,
                               scoring=scoring, before_run=before_run, on_result=shown.add, vocab=classes,
                               distractors=distractors, tiling=tiling)
    console.print(shown.detections)
    console.print(shown.images)
    console.print(f"{len(summary.records)} detections in {summary.done} image(s)")
    if json_out is not None:
        console.print(f"wrote {json_out}")
    if save_dir is not None:
        console.print(f"annotated images in {save_dir}/")
    if summary.interrupted:
        err_console.print(f"interrupted: {summary.done} of {summary.images} image(s) done"
                          + (f", their {len(summary.records)} detections in {json_out}" if json_out else ""),
                          markup=False)
        raise typer.Exit(code=130)
    if summary.failed or summary.problems:
        raise typer.Exit(code=3)


class _Shown:
    """The progress bar and the two tables (detections, images), filled as each image finishes."""

    def __init__(self, bar) -> None:
        self.bar, self.task = bar, None
        self.detections = Table("image", "label", "score", "box (x1, y1, x2, y2)")
        self.images = Table("image", "size", "detections", "ms (batch mean)")

    def start(self, total: int) -> None:
        self.task = self.bar.add_task("detecting", total=total)

    def add(self, p, shown: Path) -> None:
        self.bar.advance(self.task)
        if p.error:
            warn(p.error)
            return
        d = p.detections
        for name, score, box in zip(d.names, d.scores.tolist(), d.boxes_xyxy.tolist()):
            self.detections.add_row(str(shown), name, f"{score:.3f}", ", ".join(f"{v:.1f}" for v in box))
        (h, w) = p.original_size
        self.images.add_row(str(shown), f"{w}x{h}", str(len(d)), f"{p.seconds * 1000:.0f}")


def _model_labels(flags: O.ModelFlags, export_dir: Path | None) -> list[str]:
    """The model's own vocabulary (``labels`` in its preset or export), announced on stderr; [] if none."""
    if export_dir is not None:
        from regionclip.onnx.manifest import read_manifest

        names = list(read_manifest(export_dir, verify=False).get("config", {}).get("labels") or [])
    else:
        names = list(O.resolve_config(flags).labels)
    if names:
        err_console.print(f"labels: the model's own {len(names)} ({', '.join(names)}); --labels to choose others",
                          markup=False)
    return names


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
    from regionclip.predictor import Predictor

    net = Predictor.from_onnx(folder, device=device or "cpu")
    net.scoring_config(**scoring)  # the export's scoring with the flags, checked before any image runs
    return net
