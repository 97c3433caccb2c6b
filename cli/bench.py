"""``regionclip bench``: images/s and per-stage cost of a model on synthetic inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from . import options as O
from .render import console, progress


@O.with_model_flags(text_cache=False)
def bench(
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 1,
    image_size: Annotated[str, typer.Option(help="Synthetic image size as HEIGHTxWIDTH.")] = "640x853",
    labels: Annotated[int, typer.Option("--labels", help="Vocabulary size (synthetic labels, embedded once before timing).")] = 10,
    proposals: Annotated[Optional[int], typer.Option(help=f"Proposals per image ({O.PRESET}).", show_default=False)] = None,
    iters: Annotated[int, typer.Option(help="Timed batches.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed batches first (the first also counts FLOPs).")] = 2,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full result here.", show_default=False)] = None,
    flags: O.ModelFlags = None,
) -> None:
    """Time the pipeline on synthetic images: images/s, ms per stage, GFLOP/image, peak memory."""
    from regionclip.bench import check_settings, parse_size, run_benchmark
    from regionclip.outputs import check_output_file

    size = parse_size(image_size)
    check_settings(batch_size=batch_size, image_size=size, num_labels=labels, iters=iters, warmup=warmup,
                   num_proposals=proposals)
    if json_out is not None:
        check_output_file(json_out, "--json")
    net = O.build_model(flags, [f"proposals.num_proposals={proposals}"] if proposals is not None else [])
    with progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=warmup + iters)
        result = run_benchmark(net, batch_size=batch_size, image_size=size, num_labels=labels, iters=iters,
                               warmup=warmup, progress=lambda done, total: bar.update(task, completed=done),
                               json_out=json_out)
    console.print(result_table(result))
    if json_out is not None:
        console.print(f"wrote {json_out}")


def result_table(r: dict) -> Table:
    from regionclip.bench import STAGE_NAMES

    s = r["settings"]
    title = (f"{s['clip_model']} {s['mode']} + {s['detector']}, {s['precision']}, batch {s['batch_size']}, "
             f"{s['image_size'][0]}x{s['image_size'][1]}, {s['num_proposals']} proposals, {s['num_labels']} labels "
             f"on {r['device_name']}")
    table = Table("measure", "median", "p10", "p90", title=title, caption=f"peak memory: {r['memory_kind']}")
    table.add_row("images/s", f"{r['images_per_s']:.2f}", "", "")
    for name, q in [("batch (ms)", r["batch_ms"])] + [
            (f"  {STAGE_NAMES[k]} (ms)", v) for k, v in r["stages_ms"].items()]:
        table.add_row(name, *(f"{q[k]:.2f}" for k in ("median", "p10", "p90")))
    table.add_row("text encoding, once (ms)", f"{r['text_encode_ms']:.1f}", "", "")
    table.add_row("boxes / image", f"{r['boxes_per_image']:.0f}", "", "")
    table.add_row("GFLOP / image", f"{r['gflop_per_image']:.1f}", "", "")
    table.add_row("achieved TFLOP/s", f"{r['achieved_tflops']:.3f}", "", "")
    table.add_row("peak memory (MiB)", f"{r['peak_memory_mb']:.0f}", "", "")
    return table
