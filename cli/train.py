"""``regionclip train``: run a training config with a live progress bar (loss, lr, img/s)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as O
from .render import console, progress


def train(
    config: Annotated[Path, typer.Argument(help="Training YAML, e.g. configs/train/shapes_demo.yaml.", show_default=False)],
    set_: O.Set = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (overrides out_dir in the config).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help=(
        "Continue from a last.pt/best.pt of an earlier run. With a staged config (stages: ...), pass the "
        "output folder: each stage continues from its own last.pt and finished stages are skipped."))] = None,
) -> None:
    """Train region-text matching (and optionally the proposal stage); write checkpoints, metrics and model.pt.

    The config's stage is finetune (boxes), clip (image-caption pairs) or region_pretrain (teacher
    pseudo-labelled regions from captions' concepts); a config with a stages list runs them in turn.

    The output folder is checked before data or model are built.
    """
    from regionclip.outputs import check_output_dir
    from regionclip.train import load_train_config, train as run_training

    cfg = load_train_config(config, set_ or [], out)
    check_output_dir(cfg.out_dir, "--out" if out is not None else "out_dir")
    bar = progress()
    tasks: dict[str | None, int] = {}

    def report(event: dict) -> None:
        bar.start()  # on the first event: data and model are built, so config errors print alone
        stage = event.get("stage")
        prefix = f"{stage}: " if stage else ""
        if "eval" in event:
            figures = event["eval"]
            ap = ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if isinstance(v, float))
            recall = ", ".join(f"{k} {v:.1f}" for k, v in figures.get("R50@100", {}).items() if v is not None)
            bar.console.print(f"{prefix}step {event['step']}: val AP50 {ap}"
                              + (f"; proposal recall@100 (IoU 0.5) {recall}" if recall else ""))
            return
        if stage not in tasks:  # a staged config: one bar per stage
            tasks[stage] = bar.add_task(prefix or "training", total=event["max_steps"])
        loss = event["loss"]  # NaN until the first log_every step: the loss is read only there
        bar.update(tasks[stage], completed=event["step"], description=(
            f"{prefix}" + (f"loss {loss:.3f} " if loss == loss else "")
            + f"lr {event['lr']:.2e} {event['img_per_s']:.1f} img/s"))

    try:
        result = run_training(cfg, resume=resume, progress=report)
    finally:
        bar.stop()
    console.print(f"trained {result.step} steps; model and preset in {cfg.out_dir}/ "
                  f"(regionclip detect --model {cfg.out_dir}/preset.yaml ...)")
