"""``regionclip eval``: COCO mAP with open-vocabulary splits, and the GT-box protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from regionclip.errors import BadInput
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
    if "short_lists" in report:
        render_short_lists(report["short_lists"])
    s = report["settings"]
    if "images_per_second" in s:
        console.print(f"{s['images']} images in {s['seconds']:.1f} s ({s['images_per_second']:.2f} img/s), "
                      f"vocabulary {s['vocabulary_size']}, mode {s['mode']}, proposals {s['proposals']}")
    if report.get("images_skipped"):
        warn(f"{report['images_skipped']} image(s) skipped (missing or unreadable)")
    if report.get("images_mismatched"):
        warn(f"{report['images_mismatched']} image(s) do not have the size the annotation file gives them: "
             "other images of the same names? their figures mean little")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def render_short_lists(sl: dict) -> None:
    """One row per list and the mean: listed names' precision, recall, AP50 and the foreign-label
    rate, each beside the full vocabulary's run filtered to the list."""
    st = sl["settings"]
    t = Table("labels", "P", "R", "AP50", "foreign", "ref P", "ref R", "ref AP50", "ref foreign",
              title=f"Short lists (%): {st['lists']} lists of {st['size']}, distractors {st['distractors']}; "
                    "ref = all names, filtered to the list")
    for row in [*sl["lists"], {"labels": ["mean"], **sl["mean"], "reference": sl["reference_mean"]}]:
        ref = row["reference"]
        t.add_row(", ".join(row["labels"]), _pct(row["precision"]), _pct(row["recall"]), _fmt(row["AP50"]),
                  _pct(row["foreign"]), _pct(ref["precision"]), _pct(ref["recall"]), _fmt(ref["AP50"]),
                  _pct(ref["foreign"]))
    console.print(t)
    change = sl["score_change_median"]
    console.print(f"foreign = unlisted objects given a listed name (IoU >= 0.5); median score change of a "
                  f"box between its list and all names: {'-' if change is None else f'{change:.3f}'} "
                  f"({sl['score_changes']} boxes)")


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
    short_lists: Annotated[int, typer.Option(help=(
        "Also detect N seeded random short lists of the vocabulary's names, each with only its names, and report "
        "precision, recall, AP50 and the foreign-label rate per list beside the full vocabulary's (0: off)."))] = 0,
    short_list_size: Annotated[int, typer.Option(help="Names per short list.")] = 3,
    short_list_seed: Annotated[int, typer.Option(help="Seed of the short lists' draw.")] = 0,
    distractors: O.Distractors = None,
    tile: O.Tile = None,
    tile_overlap: O.TileOverlap = None,
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
    if short_lists < 0:
        raise BadInput(f"--short-lists must be 0 (off) or more, but got {short_lists}")
    O.check_distractors(distractors)
    tiling = O.check_tile(tile, tile_overlap)
    classes = O.resolve_vocab(_vocabulary(vocabulary), vocab_file, exemplar)
    with progress(transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        report = run_eval(annotations, lambda: O.build_model(flags), images=images, results=results, split=split,
                          vocabulary=_vocabulary(vocabulary), proposals=proposals, top_k=top_k, batch_size=batch_size,
                          text_embeddings=text_embeddings, report_out=json_out, results_out=results_out,
                          progress=lambda n: bar.advance(task, n), total=lambda n: bar.update(task, total=n),
                          vocab=classes, distractors=distractors,
                          short_lists=(short_lists, short_list_size, short_list_seed) if short_lists else None,
                          tiling=tiling)
    render(report)
    if json_out is not None:
        console.print(f"wrote {json_out}")


def _vocabulary(vocabulary: str | None) -> list[str] | None:
    if not vocabulary:
        return None
    p = Path(vocabulary)
    items = read_label_lines(p, "vocabulary file") if p.is_file() else vocabulary.split(",")
    return [s.strip() for s in items if s.strip()]
