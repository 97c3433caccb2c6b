"""``regionclip eval``: COCO mAP with open-vocabulary splits, and the GT-box protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.errors import BadAnnotations, BadImage, BadInput
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
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.", show_default=False)] = None,
    results_out: Annotated[Optional[Path], typer.Option(help="Write the COCO results JSON here.", show_default=False)] = None,
    flags: O.ModelFlags = None,
) -> None:
    """Evaluate on COCO-format data: AP/AP50/AP75/APs/APm/APl overall and per split (pycocotools).

    Arguments, output paths and the split are checked before any model is built.
    """
    from regionclip.data.splits import load_split
    from regionclip.evaluate import check_split, load_ground_truth, write_report
    from regionclip.outputs import atomic_write_json, check_output_file

    if proposals not in ("model", "gt"):
        raise BadInput(f"--proposals must be 'model' or 'gt', but got {proposals!r}")
    O.check_positive("--top-k", top_k)
    O.check_positive("--batch-size", batch_size)
    for path, flag in ((json_out, "--json"), (results_out, "--results-out")):
        if path is not None:
            check_output_file(path, flag)
    gt = load_ground_truth(annotations)
    vocab = _vocabulary(vocabulary)
    parts = load_split(split) if split is not None else None
    if parts is not None:
        check_split(gt, parts, vocab if results is None else None)
    if results is not None:
        if text_embeddings is not None:
            raise BadInput("--text-embeddings is for running a model (--images), not for scoring --results")
        report = _score_file(gt, results, parts)
    else:
        emb = _text_embeddings(gt, vocab, text_embeddings)
        report, records = _run_model(gt, images, parts, vocab, proposals, top_k, batch_size, flags, emb)
        if results_out is not None:
            atomic_write_json(results_out, records, indent=None)
    render(report)
    if json_out is not None:
        write_report(report, json_out)
        console.print(f"wrote {json_out}")


def _vocabulary(vocabulary: str | None) -> list[str] | None:
    if not vocabulary:
        return None
    p = Path(vocabulary)
    items = read_label_lines(p, "vocabulary file") if p.is_file() else vocabulary.split(",")
    return [s.strip() for s in items if s.strip()]


def _text_embeddings(gt, vocab: list[str] | None, path: Path | None):
    """--text-embeddings checked against the vocabulary the run will use (its count), before any model."""
    if path is None:
        return None
    from regionclip.eval_dataset import vocabulary_for

    return O.read_text_embeddings(path, vocabulary_for(gt, vocab)[0])


def _score_file(gt, results: Path, parts) -> dict:
    from regionclip.eval_dataset import evaluate_results

    if not results.is_file():
        raise BadAnnotations(f"results file not found: {results}")
    try:
        records = json.loads(results.read_text())
    except json.JSONDecodeError as exc:
        raise BadAnnotations(f"{results}: not valid JSON ({exc.msg})") from None
    return evaluate_results(gt, records, parts)


def _run_model(gt, images, parts, vocab, proposals, top_k, batch_size, flags, emb) -> tuple[dict, list[dict]]:
    from regionclip.eval_dataset import evaluate_model

    if images is None:
        raise BadInput("pass --images FOLDER to run a model, or --results FILE to score existing results")
    if not images.is_dir():
        raise BadImage(f"images folder not found: {images}")
    net = O.build_model(flags)
    with progress(transient=True) as bar:
        task = bar.add_task("evaluating", total=len(gt.imgs))
        return evaluate_model(net, gt, images, split=parts, vocabulary=vocab, proposals=proposals, top_k=top_k,
                              batch_size=batch_size, text_embeddings=emb, progress=lambda n: bar.advance(task, n))
