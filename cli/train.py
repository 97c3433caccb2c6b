"""``regionclip train``: run a training config with a live progress bar (loss, lr, img/s)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from regionclip.errors import BadInput

from .render import console, err_console, progress, warn


def retention_table(report: dict, prefix: str = ""):
    """AP50 per set and part, before and after (and the fine-tuned weights before WiSE-FT mixing)."""
    from rich.table import Table

    columns = [c for c in ("before", "fine_tuned", "after") if c in report]
    alpha = report.get("wise_alpha")
    names = {"before": "before", "fine_tuned": "fine-tuned", "after": f"after (WiSE-FT {alpha})" if alpha and alpha < 1 else "after"}
    table = Table(title=f"{prefix}retention: AP50", title_justify="left")
    for title in ["set", *(names[c] for c in columns)]:
        table.add_column(title)
    for where, label in (("held_out", "held-out (start's names)"), ("new", "new classes (val)")):
        for part in ("overall", "base", "novel"):
            row = [report[c].get(where, {}).get(part) for c in columns]
            if any(v is not None for v in row):
                table.add_row(f"{label} {part}", *("" if v is None else f"{v:.1f}" for v in row))
    return table


def train(
    config: Annotated[Path, typer.Argument(help="Training YAML, e.g. configs/train/shapes_demo.yaml.", show_default=False)],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=(
        "Dotted config override, e.g. --set optim.lr=3e-4 (repeatable). In a staged config it changes the "
        "file's sections, which a stage that sets the same key overrides: --set stages.captions.optim.max_steps=3 "
        "changes one stage, stages.*.optim.max_steps=3 every stage."), show_default=False)] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help=(
        "Run only these stages of a staged config, comma-separated (e.g. boxes or boxes,captions). A stage "
        "whose predecessor does not run starts from that one's finished output in the output folder."),
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help=(
        "Output folder (overrides out_dir in the config; with --resume, default: the resumed run's folder)."),
        show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(help=(
        "Continue an earlier run: pass its output folder (or a last.pt/best.pt). With a staged config each stage "
        "continues from its own OUT/<stage>/last.pt and finished stages are skipped."), show_default=False)] = None,
) -> None:
    """Train region-text matching (and optionally the proposal stage); write checkpoints, metrics and model.pt.

    The config's stage is finetune (boxes), clip (image-caption pairs) or region_pretrain (teacher
    pseudo-labelled regions from captions' concepts); a config with a stages list runs them in turn.
    Relative data paths in the config are read from its folder or the checkout, not the current folder.

    The output folder is checked before data or model are built.
    """
    from regionclip.outputs import check_output_dir
    from regionclip.train import load_train_config, train as run_training
    from regionclip.train.config import resolve_resume
    from regionclip.train.overrides import unreached_overrides

    only = [name.strip() for name in stages.split(",") if name.strip()] if stages is not None else None
    if only is not None and not only:
        raise BadInput("--stages needs at least one stage name, e.g. --stages boxes")
    cfg = load_train_config(config, set_ or [], out, stages=only, resume=resume)
    resume_from = resolve_resume(cfg, resume)
    check_output_dir(cfg.out_dir, "--out" if out is not None else "out_dir")
    for line in unreached_overrides(cfg.stages, set_ or []):
        warn(line)
    _say_device(cfg.model.device)
    bar = progress()
    tasks: dict[str | None, int] = {}

    def report(event: dict) -> None:
        bar.start()  # on the first event: data and model are built, so config errors print alone
        stage = event.get("stage")
        prefix = f"{stage}: " if stage else ""
        if "retention" in event:
            bar.console.print(retention_table(event["retention"], prefix))
            return
        if "eval" in event:
            figures = event["eval"]
            ap = ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if isinstance(v, float))
            recall = ", ".join(f"{k} {v:.1f}" for k, v in figures.get("R50@100", {}).items() if v is not None)
            short = figures.get("short_lists")
            short = (", ".join(f"{k} {v:.3f}" if k != "AP50" else f"{k} {v:.1f}" for k, v in short.items()
                               if v is not None) if short else "")
            bar.console.print(f"{prefix}step {event['step']}: val AP50 {ap}"
                              + (f"; proposal recall@100 (IoU 0.5) {recall}" if recall else "")
                              + (f"; 3-name lists: {short}" if short else ""))
            return
        if stage not in tasks:  # a staged config: one bar per stage
            tasks[stage] = bar.add_task(prefix or "training", total=event["max_steps"])
        loss = event["loss"]  # NaN until the first log_every step: the loss is read only there
        bar.update(tasks[stage], completed=event["step"], description=(
            f"{prefix}" + (f"loss {loss:.3f} " if loss == loss else "")
            + f"lr {event['lr']:.2e} {event['img_per_s']:.1f} img/s"))

    try:
        result = run_training(cfg, resume=resume_from, progress=report)
    finally:
        bar.stop()
    console.print(f"trained {result.step} steps; model and preset in {cfg.out_dir}/ "
                  f"(regionclip detect --model {cfg.out_dir} ...)")


def _say_device(device: str) -> None:
    """Under torchrun every rank says which device it trains on (``runtime.resolve_device``)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        from regionclip.runtime import describe_device, resolve_device

        err_console.print(f"rank {os.environ.get('RANK', '0')} of {world}: training on "
                          f"{describe_device(resolve_device(device))}", markup=False)
