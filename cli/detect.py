"""``regionclip detect``: label boxes in images with any vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.errors import BadImage, BadInput
from regionclip.io import expand_inputs
from regionclip.runner import iter_detect
from regionclip.visualize import save_annotated

from . import options as O
from .render import console, progress, warn


def read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    items: list[str] = []
    if labels:
        items += labels.split(",")
    if labels_file is not None:
        if not labels_file.is_file():
            raise BadInput(f"labels file not found: {labels_file}")
        items += labels_file.read_text().splitlines()
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise BadInput('no labels given: pass --labels "dog,cat" or --labels-file vocab.txt (one per line)')
    return list(dict.fromkeys(items))


@O.with_model_flags()
def detect(
    inputs: Annotated[list[str], typer.Argument(help="Image files, directories or glob patterns.", show_default=False)],
    labels: Annotated[Optional[str], typer.Option("--labels", "-l", help='Comma-separated vocabulary, e.g. "dog,cat,bicycle".')] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="Vocabulary file, one label per line.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write COCO-style result records (with 'image' file names) here.")] = None,
    save_dir: Annotated[Optional[Path], typer.Option(help="Write annotated copies of the images here.")] = None,
    score_threshold: Annotated[Optional[float], typer.Option(help="Drop detections scoring below this (0..1).")] = None,
    max_detections: Annotated[Optional[int], typer.Option(help="Keep at most this many detections per image.")] = None,
    nms_iou: Annotated[Optional[float], typer.Option(help="IoU for per-label non-maximum suppression.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    flags: O.ModelFlags = None,
) -> None:
    """Detect objects named by --labels in images; print a table, optionally write JSON and annotated images.

    Exits non-zero if any input could not be read (the others are still processed).
    """
    vocab = read_labels(labels, labels_file)
    paths, problems = expand_inputs(inputs)
    if not paths:
        raise BadImage("no images to process: " + "; ".join(problems))
    for p in problems:
        warn(p)
    net = O.build_model(flags)
    kwargs = dict(score_threshold=score_threshold, max_detections=max_detections, nms_iou=nms_iou)
    records, failed = [], len(problems)
    table = Table("image", "label", "score", "box (x1, y1, x2, y2)")
    with progress(transient=True) as bar:
        task = bar.add_task("detecting", total=len(paths))
        for r in iter_detect(net, paths, vocab, batch_size, **{k: v for k, v in kwargs.items() if v is not None}):
            bar.advance(task)
            if r.error:
                warn(r.error)
                failed += 1
                continue
            records += r.detections.to_records(image=str(r.path))
            for name, score, box in zip(r.detections.names, r.detections.scores.tolist(), r.detections.boxes_xyxy.tolist()):
                table.add_row(r.path.name, name, f"{score:.3f}", ", ".join(f"{v:.1f}" for v in box))
            if save_dir is not None:
                save_annotated(save_dir / f"{r.path.stem}.jpg", r.image, r.detections)
    console.print(table)
    console.print(f"{len(records)} detections in {len(paths) - (failed - len(problems))} image(s)")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(records, indent=1))
        console.print(f"wrote {json_out}")
    if save_dir is not None:
        console.print(f"annotated images in {save_dir}/")
    if failed:
        raise typer.Exit(code=3)
