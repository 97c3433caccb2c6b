"""``regionclip export``: a model -> ONNX graphs + manifest.json, for onnxruntime and ``detect --model DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from regionclip.errors import BadInput
from regionclip.onnx.manifest import OPSET

from . import options as O
from .render import console

FORMATS = ("onnx",)


@O.with_model_flags(text_cache=False)
def export(
    out: Annotated[Path, typer.Option("--out", help="Folder for the graphs and manifest.json (created; same-named "
                                                    "files in it are replaced).", show_default=False)],
    format_: Annotated[str, typer.Option("--format", help="Export format.")] = "onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset; at least 16 (RoiAlign's aligned mode).")] = OPSET,
    flags: O.ModelFlags = None,
) -> None:
    """Export a model as separate ONNX graphs (proposals, region encoder, text tower, scoring) and a manifest.

    Labels are an input of the scoring graph: any vocabulary runs without exporting again. Runs
    on the CPU unless --device says otherwise; each graph is checked against torch at a second
    input size before the command succeeds.
    """
    from regionclip.onnx import export_onnx, require
    from regionclip.outputs import check_output_dir

    if format_ not in FORMATS:
        raise BadInput(f"unknown --format '{format_}': use {', '.join(FORMATS)}")
    if opset < 16:
        raise BadInput(f"--opset must be at least 16 (RoiAlign's aligned mode), but got {opset}")
    check_output_dir(out, "--out")
    for package in ("onnx", "onnxruntime"):  # before the model is built
        require(package)
    cfg = O.resolve_config(flags)
    cfg.device = flags.device or "cpu"
    export_onnx(O.build_model(cfg), out, opset=opset)
    written = sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".json"))
    console.print(f"exported {cfg.name} to {out}/: {', '.join(written)}")
    console.print(f"  use it: regionclip detect IMAGE --model {out} --labels \"dog,cat\"")
