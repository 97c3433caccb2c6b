"""``regionclip eval``: COCO mAP with open-vocabulary splits, and the GT-box protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.data.splits import load_split
from regionclip.errors import BadAnnotations, BadInput
from regionclip.eval_dataset import evaluate_model, evaluate_results
from regionclip.evaluate import load_ground_truth, write_report

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
    s = report["settings"]
    if "images_per_second" in s:
        console.print(f"{s['images']} images in {s['seconds']:.1f} s ({s['images_per_second']:.2f} img/s), "
                      f"vocabulary {s['vocabulary_size']}, mode {s['mode']}, proposals {s['proposals']}")
    if report.get("images_skipped"):
        warn(f"{report['images_skipped']} image(s) skipped (missing or unreadable)")


@O.with_model_flags()
def eval_(
    annotations: Annotated[Path, typer.Option(help="COCO instances JSON (ground truth).")],
    images: Annotated[Optional[Path], typer.Option(help="Image folder; detection runs over every image of the file.")] = None,
    results: Annotated[Optional[Path], typer.Option(help="Score this COCO results JSON instead of running a model.")] = None,
    split: Annotated[Optional[Path], typer.Option(help="YAML/JSON with base/novel category names, e.g. configs/splits/ovd_coco.yaml.")] = None,
    vocabulary: Annotated[Optional[str], typer.Option(help="Comma-separated labels or a file (one per line); default: the file's categories.")] = None,
    proposals: Annotated[str, typer.Option(help="'model' (detect) or 'gt' (classify ground-truth boxes).")] = "model",
    top_k: Annotated[int, typer.Option(help="Labels kept per box for mAP.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.")] = None,
    results_out: Annotated[Optional[Path], typer.Option(help="Write the COCO results JSON here.")] = None,
    flags: O.ModelFlags = None,
) -> None:
    """Evaluate on COCO-format data: AP/AP50/AP75/APs/APm/APl overall and per split (pycocotools)."""
    gt = load_ground_truth(annotations)
    parts = load_split(split) if split is not None else None
    if results is not None:
        if not results.is_file():
            raise BadAnnotations(f"results file not found: {results}")
        try:
            records = json.loads(results.read_text())
        except json.JSONDecodeError as exc:
            raise BadAnnotations(f"{results}: not valid JSON ({exc.msg})") from None
        report = evaluate_results(gt, records, parts)
    else:
        if images is None:
            raise BadInput("pass --images FOLDER to run a model, or --results FILE to score existing results")
        vocab = None
        if vocabulary:
            p = Path(vocabulary)
            vocab = [s.strip() for s in (p.read_text().splitlines() if p.is_file() else vocabulary.split(",")) if s.strip()]
        net = O.build_model(flags)
        with progress(transient=True) as bar:
            task = bar.add_task("evaluating", total=len(gt.imgs))
            report, records = evaluate_model(net, gt, images, split=parts, vocabulary=vocab, proposals=proposals,
                                             top_k=top_k, batch_size=batch_size, progress=lambda n: bar.advance(task, n))
        if results_out is not None:
            results_out.parent.mkdir(parents=True, exist_ok=True)
            results_out.write_text(json.dumps(records))
    render(report)
    if json_out is not None:
        write_report(report, json_out)
        console.print(f"wrote {json_out}")
