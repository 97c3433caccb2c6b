"""``regionclip demo``: offline, draws a shapes image and detects in it with the bundled demo model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .render import console


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the drawn image and its annotated copy.")] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Which random shapes image to draw.")] = 0,
) -> None:
    """Draw a synthetic shapes image, detect the 12 '<colour> <shape>' names with the demo model, save and print."""
    import numpy as np

    from regionclip import RegionCLIP
    from regionclip.data.shapes import CATEGORIES, render_shapes_image
    from regionclip.outputs import check_output_dir
    from regionclip.visualize import save_annotated

    check_output_dir(out, "--out")
    image, truth = render_shapes_image(np.random.default_rng(seed), size=(288, 384), empty_prob=0.0)
    model = RegionCLIP.from_pretrained("demo")
    dets = model.detect(image, CATEGORIES).cpu()
    save_annotated(out / "input.jpg", image, dets[:0])
    path = save_annotated(out / "detections.jpg", image, dets)
    table = Table("label", "score", "box (x1, y1, x2, y2)")
    for name, score, box in zip(dets.names, dets.scores.tolist(), dets.boxes_xyxy.tolist()):
        table.add_row(name, f"{score:.3f}", ", ".join(f"{v:.0f}" for v in box))
    console.print(table)
    console.print("drawn: " + "; ".join(f"{name} at {list(box)}" for box, name in truth))
    console.print(f"annotated image: {path}")
