"""``regionclip calibrate``: fit each class's score threshold on a labelled set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.errors import BadInput

from . import options as O
from .detect import read_labels
from .render import console, progress


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


@O.with_model_flags()
def calibrate(
    annotations: Annotated[Path, typer.Option(help="COCO instances JSON of the labelled set.", show_default=False)],
    images: Annotated[Path, typer.Option(help="Its image folder.", show_default=False)],
    labels: Annotated[Optional[str], typer.Option("--labels", "-l", help=(
        'Comma-separated classes, e.g. "dog,cat" (category names of the annotation file).'),
        show_default=False)] = None,
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
    """Fit per-class thresholds (IoU 0.5 matches) to a precision target or max F1, then detect the same images
    with the tuned vocabulary: print what each class is expected to reach beside what it measured, and write
    the tuned vocabulary (target, expected and measured figures stated in the file)."""
    from regionclip.calibrate import run_calibrate

    precision = target_precision
    if (precision is None) == (not max_f1):
        raise BadInput("give one target: --target-precision P (e.g. 0.9) or --max-f1")
    if out is None:
        raise BadInput("--out tuned.yaml is needed: where the tuned vocabulary goes")
    names = read_labels(labels, None)
    vocab = O.resolve_vocab(names, vocab_file, exemplar)
    if vocab is None and names:
        from regionclip.vocabulary import Vocabulary

        vocab = Vocabulary.from_labels(names)
    if vocab is None:
        raise BadInput('give the classes to calibrate: --labels "dog,cat", --vocab labels.yaml or '
                       "--exemplar NAME=IMAGE:x1,y1,x2,y2")
    O.check_positive("--batch-size", batch_size)
    with progress(transient=True) as bar:
        task = bar.add_task("calibrating", total=None)
        fits, measured = run_calibrate(annotations, images, vocab, out, lambda: O.build_model(flags),
                                       precision=precision, batch_size=batch_size,
                                       progress=lambda n: bar.advance(task, n))
    console.print(_table(fits, measured, f"precision {precision:g}" if precision is not None else "max F1"))
    console.print(f"wrote {out}")


def _table(fits, measured, target: str) -> Table:
    """Per class: threshold, expected and measured precision and recall, detections kept, GT boxes."""
    table = Table("class", "threshold", "precision % expected", "measured", "recall % expected", "measured",
                  "kept", "GT", title=f"expected ({target}) and measured with the tuned vocabulary, same images")
    by_name = {m.name: m for m in measured}
    for f in fits:
        m = by_name[f.name]
        thr = "-" if f.threshold is None else f"{f.threshold:.3f}"
        table.add_row(f.name + ("" if f.reached else " (target not reached)"), thr, _pct(f.precision),
                      _pct(m.precision), _pct(f.recall), _pct(m.recall), str(m.detections), str(f.gt))
    return table
