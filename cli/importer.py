"""``regionclip import``: RegionCLIP's released files -> a regionclip checkpoint + preset YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .render import console

DEFAULT_OUT = "~/.cache/regionclip"  # where the regionclip-rn50-* presets read their checkpoints


def import_(
    weights: Annotated[Path, typer.Argument(help=(
        "RegionCLIP model file: regionclip_pretrained-cc_{rn50,rn50x4}.pth (zero-shot) or "
        "regionclip_finetuned-{coco,lvis}_{rn50,rn50x4}.pth."), show_default=False)],
    rpn: Annotated[Path, typer.Argument(help=(
        "Its RPN: rpn_lvis_866.pth (R50-FPN, zero-shot) or rpn_coco_48.pth (R50-C4, OV-COCO); the model file "
        "again uses the RPN copy a fine-tuned file carries."), show_default=False)],
    out: Annotated[Path, typer.Option(help=(
        "Folder for NAME.pt and NAME.yaml; the regionclip-rn50-* presets read from the default."))] = Path(DEFAULT_OUT),
    text_from: Annotated[Optional[Path], typer.Option(help=(
        "The pretrained file (regionclip_pretrained-cc_rn50.pth) whose text tower a fine-tuned file lacks."),
        show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help=(
        "Base name of the written files (default: regionclip-rn50-cc, regionclip-rn50-coco, ... from the files)."),
        show_default=False)] = None,
    half: Annotated[bool, typer.Option("--half", help="Store the weights as fp16 (half the size).")] = False,
) -> None:
    """Convert RegionCLIP's released weights (microsoft/RegionCLIP, manual download) for --model.

    Every file is read with weights_only=True and loaded into its model before anything is
    written; a file of the wrong kind is one line saying what it is and what was expected (exit 4).
    """
    from regionclip.outputs import check_output_dir
    from regionclip.zoo import import_regionclip

    out = check_output_dir(out.expanduser(), "--out")
    done = import_regionclip(weights, rpn, out, text_from=text_from, name=name, half=half)
    console.print(f"RegionCLIP {done.recipe} model: CLIP {done.clip_model}, RPN {done.detector}")
    console.print(f"  checkpoint: {done.checkpoint}")
    console.print(f"  preset:     {done.preset}")
    console.print(f"  use it:     regionclip detect IMAGE --model {done.preset} --labels \"dog,cat\"")
