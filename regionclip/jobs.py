"""Jobs: what a command does, as one library call over a predictor (the CLI only parses and prints).

``detect_files``: image files, folders and globs -> COCO results records (``--json``) and
annotated copies (``--save-dir``), streamed through ``Predictor.stream``. Every argument and
output path is checked before the model is built (``build`` is called last). An interrupt
(Ctrl-C) keeps what is finished: the records of the images done are written and the summary
says how far it got.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import BadAnnotations, BadImage, BadInput
from .io import expand_inputs, header_problem
from .outputs import annotated_paths, atomic_write_text, check_output_dir, check_output_file, relative_paths
from .predictor import Prediction
from .results import dumps_records


@dataclass
class DetectSummary:
    """What ``detect_files`` did: ``records`` (COCO results of the images done), ``images``
    (inputs found), ``done`` (images detected), ``failed`` (unreadable), ``problems`` (input specs
    that matched nothing), ``interrupted`` (stopped by KeyboardInterrupt), ``warnings`` (lines to show)."""

    records: list[dict] = field(default_factory=list)
    images: int = 0
    done: int = 0
    failed: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    json_out: Path | None = None


def detect_files(
    inputs: Sequence[str | os.PathLike],
    labels: Sequence[str],
    build: Callable[[], object],
    *,
    annotations: str | os.PathLike | None = None,
    json_out: str | os.PathLike | None = None,
    save_dir: str | os.PathLike | None = None,
    text_embeddings=None,
    batch_size: int = 8,
    num_workers: int = 0,
    scoring: dict | None = None,
    before_run: Callable[[DetectSummary], None] | None = None,
    on_result: Callable[[Prediction, Path], None] | None = None,
    vocab=None,
    distractors=None,
    tiling: dict | None = None,
) -> DetectSummary:
    """Detect ``labels`` in every image of ``inputs``; write ``json_out`` and ``save_dir`` copies.

    ``build()`` returns the predictor (a ``RegionCLIP`` or ``Predictor``), called once every
    check has passed. ``labels`` may be empty with ``annotations`` (the file's categories).
    ``text_embeddings``: a file or (L, D) tensor, one row per label (its count is checked here).
    ``before_run(summary)`` is called after the checks, before the model is built (``summary``
    then holds ``problems`` and ``warnings`` to show);
    ``on_result(prediction, shown_path)`` for every image as it finishes (``shown_path``: the
    path relative to the inputs' common folder). ``vocab`` (a checked ``vocabulary.Vocabulary``)
    replaces ``labels``: its classes are the labels. ``distractors`` as ``Predictor.stream`` takes
    them (None: the vocabulary's or the model's). ``tiling``: ``{"tile": pixels, "tile_overlap":
    share}`` for ``Predictor.stream`` (small objects in large images). Returns a ``DetectSummary``; the records hold
    ``image`` and ``label`` besides COCO's ids (``Detections.to_records``).
    """
    from .visualize import save_annotated

    if json_out is not None:
        check_output_file(json_out, "--json")
    if save_dir is not None:
        check_output_dir(save_dir, "--save-dir")
    paths, problems = expand_inputs(inputs)
    if not paths:
        raise BadImage("no images to process: " + "; ".join(problems))
    _check_one_readable(paths, problems)
    targets = annotated_paths(paths, save_dir) if save_dir is not None else None
    summary = DetectSummary(images=len(paths), problems=problems, json_out=Path(json_out) if json_out else None)
    if vocab is not None:
        labels = vocab.names
    labels, image_ids, category_ids = _ids(annotations, paths, list(labels), summary.warnings)
    if text_embeddings is not None and not hasattr(text_embeddings, "shape"):
        from .vocabulary import concept_vocabulary

        text_embeddings = concept_vocabulary(text_embeddings, labels)  # its count checked before any model
    if before_run is not None:
        before_run(summary)
    net = build()
    shown = relative_paths(paths)[1]
    # One chunk leaves nothing to decode ahead of: worker processes would only cost their start.
    workers = num_workers if len(paths) > batch_size else 0
    try:
        named = {"vocab": vocab} if vocab is not None else {"labels": labels}
        for p in net.stream(paths, **named, text_embeddings=text_embeddings, batch_size=batch_size,
                            num_workers=workers, keep_images=targets is not None, distractors=distractors,
                            **(tiling or {}), **(scoring or {})):
            if p.error:
                summary.failed += 1
            else:
                d = p.detections = p.detections.cpu()
                summary.records += d.to_records(image=str(p.source), image_id=image_ids[p.index],
                                                category_ids=category_ids)
                summary.done += 1
                if targets is not None:
                    save_annotated(targets[p.index], *p.for_drawing())
            if on_result is not None:
                on_result(p, shown[p.index])
    except KeyboardInterrupt:
        summary.interrupted = True  # keep what is finished: the records below are those of done images
    if json_out is not None:
        atomic_write_text(json_out, dumps_records(summary.records))
    return summary


def _check_one_readable(paths: list[Path], problems: list[str]) -> None:
    """Raise ``BadImage`` (before any model loads) when no image's header reads: not images, or
    refused for their size. Headers are read until one passes, so a run of good images costs one."""
    reasons = []
    for path in paths:
        reason = header_problem(path)
        if reason is None:
            return
        reasons.append(reason)
    listed = "; ".join(problems + reasons[:3]) + (f"; {len(reasons) - 3} more" if len(reasons) > 3 else "")
    raise BadImage(listed if len(reasons) == 1 and not problems else f"no image can be read: {listed}")


def _ids(annotations, paths: list[Path], vocab: list[str], warnings: list[str]) -> tuple[list[str], list[int], dict | None]:
    """(vocabulary, image ids, label -> category id): from the ground truth when given, else positions."""
    if annotations is None:
        if not vocab:
            raise BadInput('no labels given: pass --labels "dog,cat" or --labels-file vocab.txt (one per line)')
        return vocab, list(range(len(paths))), None
    from .evaluate import load_ground_truth
    from .results import category_ids_for, image_ids_for

    gt = load_ground_truth(annotations)
    vocab = vocab or [c["name"] for c in gt.cats.values()]
    image_ids = image_ids_for(gt, paths)
    category_ids, missing = category_ids_for(gt, vocab)
    if not category_ids:
        raise BadAnnotations(f"none of the labels is a category of {annotations}; use its category names")
    if missing:
        warnings.append(f"{len(missing)} label(s) are not categories of {annotations} and are left out of --json "
                        f"(first: {missing[0]!r})")
    return vocab, image_ids, category_ids
