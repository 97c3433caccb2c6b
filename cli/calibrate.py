"""``regionclip calibrate``: fit each class's score threshold on a labelled set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.errors import BadInput

from . import options as O
from .render import console, progress


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


@O.with_model_flags()
def calibrate(
    annotations: Annotated[Path, typer.Option(help="COCO instances JSON of the labelled set.", show_default=False)],
    images: Annotated[Path, typer.Option(help="Its image folder.", show_default=False)],
    vocab_file: O.VocabFile = None,
    exemplar: O.Exemplar = None,
    out: Annotated[Path, typer.Option(help="Write the tuned vocabulary file (YAML) here.", show_default=False)] = None,
    target_precision: Annotated[Optional[float], typer.Option(help=(
        "Target precision per class, in (0, 1], e.g. 0.9 (--precision is the model's number format)."),
        show_default=False)] = None,
    max_f1: Annotated[bool, typer.Option("--max-f1", help="Each class at its best F1 instead.")] = False,
    batch_size: O.BatchSize = 8,
    flags: O.ModelFlags = None,
) -> None:
    """Fit per-class thresholds (IoU 0.5 matches) to a precision target or max F1; print what each class
    is expected to reach and write the tuned vocabulary (target stated in the file)."""
    from regionclip.calibrate import run_calibrate

    precision = target_precision
    if (precision is None) == (not max_f1):
        raise BadInput("give one target: --target-precision P (e.g. 0.9) or --max-f1")
    if out is None:
        raise BadInput("--out tuned.yaml is needed: where the tuned vocabulary goes")
    vocab = O.resolve_vocab(None, vocab_file, exemplar)
    if vocab is None:
        raise BadInput("give the classes to calibrate: --vocab labels.yaml or --exemplar NAME=IMAGE:x1,y1,x2,y2")
    O.check_positive("--batch-size", batch_size)
    with progress(transient=True) as bar:
        task = bar.add_task("calibrating", total=None)
        fits = run_calibrate(annotations, images, vocab, out, lambda: O.build_model(flags), precision=precision,
                             batch_size=batch_size, progress=lambda n: bar.advance(task, n))
    target = f"precision {precision:g}" if precision is not None else "max F1"
    table = Table("class", "threshold", "precision %", "recall %", "kept", "GT", title=f"expected ({target})")
    for f in fits:
        thr = "-" if f.threshold is None else f"{f.threshold:.3f}"
        table.add_row(f.name + ("" if f.reached else " (target not reached)"), thr, _pct(f.precision),
                      _pct(f.recall), str(f.detections), str(f.gt))
    console.print(table)
    console.print(f"wrote {out}")
