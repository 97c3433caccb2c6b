"""``regionclip make-shapes``: write the synthetic coloured-shapes data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .render import console, progress


def make_shapes(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the data set into (created if missing).", show_default=False)],
    train: Annotated[int, typer.Option(help="Number of training images.")] = 2000,
    val: Annotated[int, typer.Option(help="Number of validation images.")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes identical files.")] = 0,
    min_side: Annotated[int, typer.Option(help="Smallest image height/width in pixels.")] = 256,
    max_side: Annotated[int, typer.Option(help="Largest image height/width in pixels.")] = 512,
    captions_per_image: Annotated[int, typer.Option(
        help="Captions per image (phrasings naming every shape, novel ones too); 0 writes no captions files.")] = 5,
    style: Annotated[str, typer.Option(
        help="The world drawn: 'shapes' (red/green/blue/yellow circles, squares, triangles) or 'alt', a held-out "
             "check (orange/purple/cyan/pink stars, hexagons, crosses; other sizes, busier clutter, half the "
             "objects novel). Choose methods on 'shapes', report on 'alt'.")] = "shapes",
    object_size: Annotated[Optional[tuple[int, int]], typer.Option(help=(
        "Smallest and largest object side in pixels, e.g. 12 40 (default: the style's, 16 px up to 0.4 of the "
        "image). With --min-side 2048: small objects in large images, what detect --tile is for."),
        show_default=False)] = None,
    max_objects: Annotated[Optional[int], typer.Option(help=(
        "Most objects per image, each image drawing 1 to this many (default: the style's, 6; 8 for alt)."),
        show_default=False)] = None,
    others: Annotated[int, typer.Option(help=(
        "Up to this many more objects per image that are none of the classes (ellipses, diamonds, rings, "
        "half-discs, and the style's shapes in lime, teal, azure, violet or magenta), annotated as category "
        "'other' and never captioned: hard negatives for training's data.negative_categories. Everything "
        "else in the set stays as without them."))] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=(
        "Write into OUT_DIR even when it holds files (written over, none removed); without it a "
        "non-empty OUT_DIR is refused."))] = False,
) -> None:
    """Generate a small COCO-format detection set of coloured shapes (12 classes) for training and tests.

    Writes OUT_DIR/train/*.jpg, OUT_DIR/val/*.jpg, OUT_DIR/annotations/instances_{train,val}.json,
    OUT_DIR/annotations/captions_{train,val}.json (COCO Captions) and OUT_DIR/split.yaml
    (9 base classes; novel: red triangle, green circle, blue square; with --style alt: orange star,
    purple hexagon, cyan cross).
    """
    from regionclip.data.shapes import get_style, make_shapes as write_shapes

    get_style(style)  # an unknown style is one line before anything is drawn

    bar = progress()
    task = bar.add_task("drawing shapes", total=train + val)

    def report(done: int) -> None:
        bar.start()  # on the first image: argument errors print alone, without an empty bar
        bar.update(task, completed=done)

    try:
        paths = write_shapes(out_dir, n_train=train, n_val=val, seed=seed, image_size=(min_side, max_side),
                             progress=report, captions_per_image=captions_per_image, style=style,
                             overwrite=overwrite, object_size=object_size, max_objects=max_objects,
                             others=others)
    finally:
        bar.stop()
    console.print(f"[bold]{train}[/] train and [bold]{val}[/] val images in {out_dir}")
    for key in ("train_annotations", "val_annotations", "train_captions", "val_captions", "split"):
        if key in paths:  # no captions files with --captions-per-image 0
            console.print(f"  {key.replace('_', ' ')}: {paths[key]}")
