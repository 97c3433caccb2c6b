"""``manifest.json``: what an export folder holds and everything the runtime needs besides the graphs.

Each graph is listed with its file, SHA-256 and input/output names, so a missing, truncated or
swapped file is one line naming it, before onnxruntime reads anything. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import WeightsUnavailable

FORMAT = "regionclip-onnx/1"
# RoiAlign's half_pixel mode (torchvision's aligned=True) needs 16; 17 writes LayerNorm as one op.
OPSET = 17
MANIFEST = "manifest.json"
# name -> (file, input names, output names); the runtime feeds and reads exactly these.
GRAPHS = {
    "proposals": ("proposals.onnx", ["image"], None),  # outputs: objectness_{i}, deltas_{i} per level
    "regions": ("regions.onnx", ["image", "boxes"], ["embeddings"]),  # + deltas with a box head
    "text": ("text.onnx", ["tokens"], ["features"]),
    "scoring": ("scoring.onnx", ["regions", "text"], ["logits", "probabilities"]),
}
# Present when the model refines its proposals with the detector's second stage
# (proposals.source=refined); its inputs (the proposal graph's feature maps + boxes) are recorded.
SECOND_STAGE = ("second_stage", "second_stage.onnx", ["class_logits", "box_regression"])
_REEXPORT = "export it again: regionclip export --model MODEL --format onnx --out DIR"


def graph_outputs(manifest: dict, name: str) -> list[str]:
    """The output names graph ``name`` of this export has: ``GRAPHS``'s, the proposal graph's per
    level as recorded, and the regions graph's ``deltas`` when the export refines boxes."""
    if name == SECOND_STAGE[0]:
        return list(SECOND_STAGE[2])
    if GRAPHS[name][2] is None:
        return list(manifest["graphs"][name]["outputs"])
    if name == "regions" and manifest.get("box_head"):
        return [*GRAPHS[name][2], manifest["box_head"]["output"]]
    return list(GRAPHS[name][2])


def graph_inputs(manifest: dict, name: str) -> list[str]:
    """The input names of graph ``name``: ``GRAPHS``'s, or the second stage's as recorded."""
    if name == SECOND_STAGE[0]:
        return list(manifest["graphs"][name]["inputs"])
    return list(GRAPHS[name][1])


def graph_names(manifest: dict) -> list[str]:
    """The graphs this export runs: ``GRAPHS``, and the second stage when it refines proposals."""
    return [*GRAPHS, *([SECOND_STAGE[0]] if manifest.get(SECOND_STAGE[0]) else [])]


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a ``manifest.json`` (an ``export_onnx`` output)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as ``folder/manifest.json`` atomically; returns the path."""
    path = Path(folder) / MANIFEST
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of export folder ``folder``; with ``verify`` every file it lists must exist
    with the SHA-256 recorded at export. Raises ``WeightsUnavailable`` (one line) otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        what = "no such folder" if not folder.exists() else f"no {MANIFEST} in it"
        raise WeightsUnavailable(f"{folder} is not an ONNX export ({what}): {_REEXPORT}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsUnavailable(f"{path}: not a readable manifest ({type(exc).__name__}): {_REEXPORT}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise WeightsUnavailable(f"{path}: format {found!r}, this regionclip reads {FORMAT!r}: {_REEXPORT}")
    files = {name: entry for name, entry in data.get("graphs", {}).items()}
    missing = [n for n in graph_names(data) if n not in files]
    if missing:
        raise WeightsUnavailable(f"{path} lists no {missing[0]} graph: {_REEXPORT}")
    if verify:
        extra = [data["distractors"]] if data.get("distractors", {}).get("file") else []
        for entry in [*files.values(), data["tokenizer"], *extra]:
            check_file(folder, entry)
    return data


def check_file(folder: Path, entry: dict) -> Path:
    """``folder / entry["file"]``, which must exist with digest ``entry["sha256"]``."""
    path = folder / entry["file"]
    if not path.is_file():
        raise WeightsUnavailable(f"{path} is missing from the ONNX export: {_REEXPORT}")
    if file_digest(path) != entry["sha256"]:
        raise WeightsUnavailable(f"{path} is not the file this export wrote (its SHA-256 differs from "
                                 f"{MANIFEST}'s; replaced or damaged): {_REEXPORT}")
    return path
