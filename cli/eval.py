"""``regionclip eval``: COCO mAP with open-vocabulary splits, and the GT-box protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.labels import read_label_lines

from . import options as O
from .render import console, progress, warn


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(report: dict) -> None:
    m = report["map"]
    parts = [p for p in ("overall", "base", "novel") if p in m]
    table = Table("", *parts, title="COCO bbox mAP (%)")
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        table.add_row(key, *[_fmt(m[p][key]) for p in parts])
    console.print(table)
    if "accuracy" in report:
        acc = report["accuracy"]
        t = Table("", *acc, title="GT-box region accuracy (%)")
        for key in ("top1", "top5", "boxes"):
            t.add_row(key, *[str(acc[p][key]) if key == "boxes" else _fmt(acc[p][key]) for p in acc])
        console.print(t)
    if "proposal_recall" in report:
        rec = report["proposal_recall"]
        t = Table("", *rec, title="Class-agnostic proposal recall (%): R50 at IoU 0.5, AR over IoU 0.5:0.95")
        keys = [k for k in next(iter(rec.values())) if k != "gt"]
        for key in sorted(keys, key=lambda k: (k.split("@")[0] != "R50", int(k.split("@")[1]))):
            t.add_row(key, *[_fmt(rec[p][key]) for p in rec])
        t.add_row("GT boxes", *[str(rec[p]["gt"]) for p in rec])
        console.print(t)
    s = report["settings"]
    if "images_per_second" in s:
        console.print(f"{s['images']} images in {s['seconds']:.1f} s ({s['images_per_second']:.2f} img/s), "
                      f"vocabulary {s['vocabulary_size']}, mode {s['mode']}, proposals {s['proposals']}")
    if report.get("images_skipped"):
        warn(f"{report['images_skipped']} image(s) skipped (missing or unreadable)")
    if report.get("images_mismatched"):
        warn(f"{report['images_mismatched']} image(s) do not have the size the annotation file gives them: "
             "other images of the same names? their figures mean little")


@O.with_model_flags()
def eval_(
    annotations: Annotated[Path, typer.Option(help="COCO instances JSON (ground truth).", show_default=False)],
    images: Annotated[Optional[Path], typer.Option(help="Image folder; detection runs over every image of the file.",
                                                   show_default=False)] = None,
    results: Annotated[Optional[Path], typer.Option(help=(
        "Score this COCO results JSON instead of running a model. Records may carry 'image' (a path, matched to "
        "file_name) and 'label' (a category name) instead of ids, as detect --json writes them; names win over ids."),
        show_default=False)] = None,
    split: Annotated[Optional[Path], typer.Option(help="YAML/JSON with base/novel category names, e.g. configs/splits/ovd_coco.yaml.",
                                                  show_default=False)] = None,
    vocabulary: Annotated[Optional[str], typer.Option(help="Comma-separated labels or a file (one per line) (default: the file's categories).",
                                                      show_default=False)] = None,
    proposals: Annotated[str, typer.Option(help="'model' (detect) or 'gt' (classify ground-truth boxes).")] = "model",
    top_k: Annotated[int, typer.Option(help="Labels kept per box for mAP, at least 1.")] = 3,
    batch_size: O.BatchSize = 8,
    text_embeddings: O.TextEmbeddings = None,
    vocab_file: O.VocabFile = None,
    exemplar: O.Exemplar = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.", show_default=False)] = None,
    results_out: Annotated[Optional[Path], typer.Option(help="Write the COCO results JSON here.", show_default=False)] = None,
    flags: O.ModelFlags = None,
) -> None:
    """Evaluate on COCO-format data: AP/AP50/AP75/APs/APm/APl overall and per split (pycocotools).

    Arguments, output paths and the split are checked before any model is built.
    """
    from regionclip.eval_dataset import run_eval

    O.check_positive("--top-k", top_k)
    O.check_positive("--batch-size", batch_size)
    classes = O.resolve_vocab(_vocabulary(vocabulary), vocab_file, exemplar)
    with progress(transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        report = run_eval(annotations, lambda: O.build_model(flags), images=images, results=results, split=split,
                          vocabulary=_vocabulary(vocabulary), proposals=proposals, top_k=top_k, batch_size=batch_size,
                          text_embeddings=text_embeddings, report_out=json_out, results_out=results_out,
                          progress=lambda n: bar.advance(task, n), total=lambda n: bar.update(task, total=n),
                          vocab=classes)
    render(report)
    if json_out is not None:
        console.print(f"wrote {json_out}")


def _vocabulary(vocabulary: str | None) -> list[str] | None:
    if not vocabulary:
        return None
    p = Path(vocabulary)
    items = read_label_lines(p, "vocabulary file") if p.is_file() else vocabulary.split(",")
    return [s.strip() for s in items if s.strip()]
