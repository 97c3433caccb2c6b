"""``regionclip label``: label a whole image collection into resumable Parquet shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from regionclip.errors import BadInput

from . import options as O
from .detect import read_labels
from .render import console, err_console, progress, warn


@O.with_model_flags()
def label(
    sources: Annotated[list[str], typer.Argument(help=(
        "Image files, folders, globs, a .txt list of paths, a COCO .json (its images) or webdataset "
        ".tar shards."), show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: shard-NNNNN.parquet files and manifest.json.",
                                      show_default=False)],
    labels: Annotated[Optional[str], typer.Option("--labels", "-l", help='Comma-separated vocabulary.',
                                                  show_default=False)] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="Vocabulary file, one label per line.",
                                                        show_default=False)] = None,
    vocab_file: O.VocabFile = None,
    exemplar: O.Exemplar = None,
    distractors: O.Distractors = None,
    shard_size: Annotated[int, typer.Option(help="Images per shard file (the unit of resuming).")] = 1000,
    shard: Annotated[Optional[str], typer.Option("--shard", help=(
        "i/N: write only part i of N of the shards (SLURM arrays, other launchers)."), show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again, whatever --out holds.")] = False,
    allow_failures: Annotated[bool, typer.Option("--allow-failures", help=(
        "Exit 0 when some images cannot be decoded (they are recorded with their reason either way)."))] = False,
    embeddings: Annotated[bool, typer.Option("--embeddings", help=(
        "Also store each box's region embedding (fp16), for re-labelling with another vocabulary."))] = False,
    engine: Annotated[str, typer.Option(help="plain (this process; torchrun for many) or ray (Ray Data).")] = "plain",
    score_threshold: O.ScoreThreshold = None,
    max_detections: O.MaxDetections = None,
    nms_iou: O.NmsIou = None,
    top_k: O.TopK = None,
    agnostic_nms: O.AgnosticNms = None,
    tile: O.Tile = None,
    tile_overlap: O.TileOverlap = None,
    batch_size: O.BatchSize = 8,
    workers: Annotated[int, typer.Option(help="Processes decoding images ahead of the model.")] = 2,
    flags: O.ModelFlags = None,
) -> None:
    """Label every image of SOURCES with --labels (or --vocab / --exemplar) into Parquet shards under --out;
    run it again to resume.

    Undecodable images are recorded with their reason and the rest go on; the exit is non-zero
    at the end unless --allow-failures. Under torchrun each rank writes its own shards.
    """
    from regionclip.label.run import label_images, model_identity, scoring_identity
    from regionclip.label.shards import env_rank, parse_part

    scoring = O.check_scoring_flags(score_threshold=score_threshold, max_detections=max_detections,
                                    nms_iou=nms_iou, top_k=top_k, agnostic_nms=agnostic_nms)
    O.check_positive("--batch-size", batch_size)
    O.check_positive("--shard-size", shard_size)
    tiling = O.check_tile(tile, tile_overlap)
    if tiling and embeddings:
        raise BadInput("--embeddings embeds each box in the whole image reduced to the model's input, which "
                       "loses the small objects --tile finds: leave out one of them")
    part, (rank, world) = parse_part(shard), env_rank()
    vocab = read_labels(labels, labels_file)
    classes = O.resolve_vocab(vocab, vocab_file, exemplar)  # None: plain labels
    cfg = O.resolve_config(flags)
    vocab = classes if classes is not None else vocab or list(cfg.labels)
    if O.check_distractors(distractors) is not None:  # carried by the vocabulary: the manifest records it
        from regionclip.vocabulary import Vocabulary

        vocab = Vocabulary.from_labels(vocab).with_distractors(distractors) if not isinstance(vocab, Vocabulary) \
            else vocab.with_distractors(distractors)
    identity = {"model": model_identity(cfg, flags.model), "scoring": scoring_identity(cfg, scoring)}
    if tiling:  # it changes the boxes: a run resumed without it (or with another size) is another run
        identity["tiles"] = tiling
    args = dict(identity=identity, shard_size=shard_size, part=part, rank=rank, world=world, overwrite=overwrite,
                embeddings=embeddings, batch_size=batch_size, num_workers=workers, scoring=scoring, tiling=tiling)
    if engine not in ("plain", "ray"):
        raise BadInput(f"--engine {engine!r}: use plain or ray")
    shown = _Shown(rank == 0, _process_line(cfg.device, part, rank, world, engine))
    with shown.bar:
        if engine == "ray":
            from regionclip.label.ray_engine import label_with_ray

            summary = label_with_ray(sources, vocab, cfg, out, before_run=shown.start, on_progress=shown.advance, **args)
        else:
            summary = label_images(sources, vocab, lambda: O.build_model(cfg), out, before_run=shown.start,
                                   on_result=shown.add, **args)
    _report(summary, rank, world, allow_failures)


def _process_line(device: str, part: tuple[int, int], rank: int, world: int, engine: str) -> str | None:
    """Which process this is and the device it labels on, when the run has several (every process
    prints its own); None alone."""
    if (world == 1 and part[1] == 1) or engine == "ray":
        return None
    from regionclip.runtime import describe_device, resolve_device

    who = [f"part {part[0]} of {part[1]}"] if part[1] > 1 else []
    who += [f"rank {rank} of {world}"] if world > 1 else []
    return f"{', '.join(who)}: labelling on {describe_device(resolve_device(device))}"


class _Shown:
    """Rank 0's progress bar: images done, images/s, time left."""

    def __init__(self, visible: bool, process: str | None = None) -> None:
        from rich.progress import TextColumn

        self.bar = progress(transient=True)
        self.bar.columns = (*self.bar.columns, TextColumn("{task.fields[rate]}"))
        self.bar.disable = not visible
        self.task, self.process = None, process

    def start(self, summary) -> None:
        if self.process is not None and summary.todo:
            err_console.print(self.process, markup=False)
        for line in summary.problems:
            warn(line)
        if summary.skipped:
            err_console.print(f"resuming: {summary.skipped} of {summary.assigned} shard(s) already complete",
                              markup=False)
        self.task = self.bar.add_task("labelling", total=summary.todo, rate="")

    def add(self, p) -> None:
        self.advance(1)

    def advance(self, images: int) -> None:
        self.bar.advance(self.task, images)
        speed = self.bar.tasks[0].speed
        self.bar.update(self.task, rate=f"{speed:.1f} img/s" if speed else "")


def _report(summary, rank: int, world: int, allow_failures: bool) -> None:
    from regionclip.label.run import gather_counts

    totals = gather_counts(summary, world)
    if rank == 0:
        console.print(f"{totals['done']} image(s) labelled ({totals['failed']} failed, {totals['detections']} "
                      f"detections) in {totals['written']} shard(s); {totals['skipped']} shard(s) were already "
                      f"complete; {summary.images} image(s) in {summary.shards} shard(s) under {summary.out}")
    for image, reason in summary.failures[:10]:
        warn(reason if image in reason else f"{image}: {reason}")
    if summary.interrupted:
        err_console.print("interrupted: the shards written are complete; run the same command to continue",
                          markup=False)
        raise typer.Exit(code=130)
    failed = totals["failed"] + totals["failed_before"]
    if (failed or summary.problems) and not allow_failures:
        if rank == 0 and failed:
            earlier = f", {totals['failed_before']} of them in shards finished before" if totals["failed_before"] else ""
            err_console.print(f"{failed} image(s) could not be decoded{earlier} (recorded in the shards with "
                              "their reason); --allow-failures exits 0 for that", markup=False)
        raise typer.Exit(code=3)
