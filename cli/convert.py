"""``regionclip convert``: labelling results into COCO, Label Studio, CVAT or YOLO, and the tools'
exports of people's corrections back into COCO."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .render import console


def convert(
    results: Annotated[Path, typer.Argument(help=(
        "A `regionclip detect --json` file or a `regionclip label --out` folder; or a tool's export of "
        "corrections: Label Studio's JSON export, a CVAT COCO 1.0 zip, a YOLO dataset folder."), show_default=False)],
    to: Annotated[str, typer.Option("--to", help="coco | labelstudio | cvat | yolo.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help=(
        "Where to write: coco a .json file; labelstudio a folder (tasks.json + config.xml); cvat a .zip; "
        "yolo a dataset folder."), show_default=False)],
    source: Annotated[Optional[str], typer.Option("--from", help=(
        "What RESULTS is: regionclip | labelstudio | cvat | yolo (default: told from the file)."),
        show_default=False)] = None,
    instances: Annotated[bool, typer.Option("--instances", help=(
        "coco: a full instances file (images with sizes, categories, annotations) to train on, "
        "instead of results records (always, for a tool's export)."))] = False,
    min_score: Annotated[Optional[float], typer.Option(help="Keep detections scoring at least this.")] = None,
    most_doubtful: Annotated[Optional[int], typer.Option(help=(
        "Only the N images the run is least sure of, most doubtful first (`regionclip label` records "
        "how sure it is)."), show_default=False)] = None,
    doubt_first: Annotated[bool, typer.Option("--doubt-first", help=(
        "Every image, most doubtful first."))] = False,
    from_name: Annotated[Optional[str], typer.Option(help="labelstudio: the RectangleLabels control's name.")] = None,
    to_name: Annotated[Optional[str], typer.Option(help="labelstudio: the Image object's name.")] = None,
    model_version: Annotated[Optional[str], typer.Option(help="labelstudio: predictions' model_version.")] = None,
    copy_images: Annotated[bool, typer.Option("--copy-images", help="yolo: copy images instead of linking them.")] = False,
    image_prefix: Annotated[Optional[str], typer.Option(help=(
        "labelstudio: put this before each image path in the tasks' data.image, e.g. "
        "'/data/local-files/?d=' for Label Studio's local file serving (reading an export: take it off)."),
        show_default=False)] = None,
    images_dir: Annotated[Optional[Path], typer.Option(help=(
        "Reading a CVAT zip: the folder its file_name entries are relative to."), show_default=False)] = None,
) -> None:
    """Convert labelling results into another tool's format, one file or folder at --out; or read
    what people corrected there back (Label Studio, CVAT, YOLO) as COCO instances (--to coco)."""
    from regionclip.convert import convert as run
    from regionclip.convert import read, written_counts

    loaded = read(results, source, image_prefix=image_prefix or "", images_dir=images_dir,
                  from_name=from_name)
    options = {"instances": instances or None, "min_score": min_score, "from_name": from_name,
               "to_name": to_name, "model_version": model_version, "copy_images": copy_images or None,
               "image_prefix": image_prefix, "most_doubtful": most_doubtful, "doubt_first": doubt_first or None}
    written = run(loaded, to, out, **{k: v for k, v in options.items() if v is not None})
    images, boxes = written_counts(loaded, min_score, most_doubtful, doubt_first)
    console.print(f"wrote {written}: {images} {'task(s)' if to == 'labelstudio' else 'image(s)'}, {boxes} box(es)",
                  markup=False)
