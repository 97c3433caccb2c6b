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
    resume: Annotated[Optional[Path], typer.Option(help="Continue from a last.pt/best.pt of an earlier run.")] = None,
) -> None:
    """Train region-text matching (and optionally the proposal stage); write checkpoints, metrics and model.pt.

    The output folder is checked before data or model are built.
    """
    from regionclip.outputs import check_output_dir
    from regionclip.train import load_train_config, train as run_training

    cfg = load_train_config(config, set_ or [], out)
    check_output_dir(cfg.out_dir, "--out" if out is not None else "out_dir")
    bar = progress()
    task = bar.add_task("training", total=cfg.optim.max_steps)

    def report(event: dict) -> None:
        bar.start()  # on the first event: data and model are built, so config errors print alone
        if "eval" in event:
            ap = ", ".join(f"{k} {v:.1f}" for k, v in event["eval"].items() if v is not None)
            bar.console.print(f"step {event['step']}: val AP50 {ap}")
            return
        bar.update(task, completed=event["step"], description=(
            f"loss {event['loss']:.3f} lr {event['lr']:.2e} {event['img_per_s']:.1f} img/s"))

    try:
        result = run_training(cfg, resume=resume, progress=report)
    finally:
        bar.stop()
    console.print(f"trained {result.step} steps; model and preset in {cfg.out_dir}/ "
                  f"(regionclip detect --model {cfg.out_dir}/preset.yaml ...)")
