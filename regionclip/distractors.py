"""Distractors: names every detection is scored against and never labelled with.

A short list (``--labels "dog,cat,bicycle"``) asks the model which of three names fits a box; an
unlisted object then gets the nearest listed name. Distractors are the model's other answers:
names scored beside the listed ones in the same softmax, so a box that is something else has
somewhere to go. A box whose best match is a distractor takes part in NMS as any detection does
(it suppresses weaker boxes of listed names on the same object) and is then removed
(``scoring.select``); the listed names' scores hardly move when names are added to or removed
from the list, since the softmax's other rows stay.

Where they come from (``ModelConfig.distractors``, per call ``distractors=``, a vocabulary file's
``distractors:`` key, ``--distractors``): ``labels`` (a closed-set model's own names: the demo's
12), ``common`` (``assets/common_objects.txt``, for CLIP presets), a text file (one name per line),
a list of names, or ``none``. ``default`` (or None) means the model's own setting. Names that are
a listed class, prompt or negative, or contain one as whole words (or are contained in one), are
left out: a distractor that names the listed thing would take its boxes. A model whose CLIP
weights are random (``clip_pretrained: none`` without a checkpoint) has no default distractors.

Embeddings are cached per backend in memory, and for a torch model whose weights come from a file,
on disk (``$REGIONCLIP_CACHE`` or ``~/.cache/regionclip``, or ``text.cache_dir`` when set), keyed by
the weights, the templates and the ensemble: a second process encodes none of them again. An
ONNX export carries its model's default distractors' embeddings (``distractors.npy``).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .config import user_cache_dir
from .errors import BadInput

COMMON_OBJECTS = Path(__file__).resolve().parent / "assets" / "common_objects.txt"
# Names of a source, as ``ModelConfig.distractors`` and ``--distractors`` take them.
BUILTIN = ("labels", "common")
DEFAULT, NONE = "default", "none"


def read_names(path: str | os.PathLike, what: str = "distractors file") -> list[str]:
    """Non-blank lines of a UTF-8 file, ``#`` lines skipped, duplicates dropped (first kept)."""
    from .labels import read_label_lines

    return list(dict.fromkeys(n for n in read_label_lines(path, what) if not n.startswith("#")))


def check_spec(spec) -> None:
    """``BadInput`` (one line, before any model loads) for a spec no source matches."""
    if spec is None or isinstance(spec, (list, tuple)):
        if spec is not None and not all(isinstance(n, str) and n.strip() for n in spec):
            raise BadInput(f"distractors: expected non-empty names, but got {list(spec)!r}")
        return
    if not isinstance(spec, str):
        raise BadInput(f"distractors: expected default, none, labels, common, a file or a list of names, "
                       f"but got {spec!r}")
    if spec.strip().lower() in (DEFAULT, NONE, *BUILTIN):
        return
    if not Path(spec).expanduser().is_file():
        raise BadInput(f"distractors: {spec!r} is neither default, none, labels, common nor a file "
                       "(one name per line)")


def names_for(spec, model_labels: Sequence[str] = (), model_default=None) -> list[str]:
    """The distractor names ``spec`` means: ``default``/None -> ``model_default`` (itself a spec,
    the model's ``distractors`` setting), ``none`` -> [], ``labels`` -> ``model_labels``,
    ``common`` -> the shipped list, a path -> its lines, a list -> its names."""
    check_spec(spec)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == DEFAULT):
        if model_default is None or (isinstance(model_default, str) and model_default.strip().lower() == DEFAULT):
            return []
        return names_for(model_default, model_labels)
    if isinstance(spec, (list, tuple)):
        return list(dict.fromkeys(n.strip() for n in spec))
    key = spec.strip().lower()
    if key == NONE:
        return []
    if key == "labels":
        return list(dict.fromkeys(model_labels))
    if key == "common":
        return read_names(COMMON_OBJECTS)
    return read_names(Path(spec).expanduser())


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"\w+", text.casefold())) + " "


def unlisted(names: Iterable[str], terms: Iterable[str]) -> list[str]:
    """``names`` less those that name a listed ``term`` (a class, prompt or negative): equal to
    one, containing one as whole words ("water bottle" for "bottle") or contained in one ("glass"
    for "wine glass"), case and punctuation ignored."""
    listed = [_words(t) for t in terms if str(t).strip()]
    out = []
    for name in names:
        w = _words(name)
        if w.strip() and not any(t in w or w in t for t in listed):
            out.append(name)
    return out


def attach(backend, names: Sequence[str], emb, terms: Iterable[str], spec=None):
    """``(embeddings, count)``: ``emb`` with the distractors of ``spec`` (``names_for``; default the
    backend's) appended as rows, less those naming one of ``names`` or ``terms`` (the classes'
    prompts and negatives), and how many were appended (0: ``emb`` unchanged)."""
    check_spec(spec)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == DEFAULT):
        found = model_names(backend)
    else:
        found = names_for(spec, _labels(backend))
    found = unlisted(found, [*names, *terms])
    if not found:
        return emb, 0
    extra = embeddings(backend, found)
    if isinstance(emb, torch.Tensor):
        return torch.cat([emb.float(), extra.to(emb.device)]), len(found)
    return np.concatenate([np.asarray(emb, dtype=np.float32), np.asarray(extra, dtype=np.float32)]), len(found)


def _labels(backend) -> list[str]:
    """The model's own vocabulary (``ModelConfig.labels``), of a torch model or an ONNX export."""
    model = getattr(backend, "model", None)
    if model is not None:
        return list(model.cfg.labels)
    return list((getattr(backend, "manifest", {}).get("config") or {}).get("labels") or [])


def model_names(backend) -> list[str]:
    """The backend's default distractors: a torch model's ``distractors`` setting, or the names an
    ONNX export carries. None for randomly initialised CLIP weights: names mean nothing to them
    (a preset built with ``--clip-pretrained none``), and they would be encoded on every build."""
    model = getattr(backend, "model", None)
    if model is not None:
        if "/random/" in str(getattr(model, "clip_key", "") or ""):
            return []
        return names_for(DEFAULT, model.cfg.labels, model.cfg.distractors)
    return list(getattr(backend, "distractor_names", []) or [])


def embeddings(backend, names: Sequence[str]) -> torch.Tensor | np.ndarray:
    """(len(names), D) unit embeddings of ``names`` from ``backend``'s text tower, cached; a torch
    tensor on the model's device, or numpy for the ONNX runtime."""
    memory: dict = backend.__dict__.setdefault("_distractor_memory", {})
    stored = getattr(backend, "distractor_embeddings", None)  # an ONNX export's own
    if stored is not None and not memory.get("__stored__"):
        memory.update(zip(backend.distractor_names, torch.from_numpy(np.asarray(stored, dtype=np.float32))))
        memory["__stored__"] = True
    disk = _disk_file(backend)
    if disk is not None and not memory.get("__disk__"):
        memory["__disk__"] = True
        memory.update(_load(disk))
    missing = [n for n in dict.fromkeys(names) if n not in memory]
    if missing:
        model = getattr(backend, "model", None)
        if model is not None:  # past the text encoder's own cache: hundreds of names would crowd it
            with torch.inference_mode(), model.autocast():
                new = model.text.embed(missing)
        else:
            new = backend.encode_text(missing)
        new = new.float().cpu() if isinstance(new, torch.Tensor) else torch.from_numpy(np.asarray(new, np.float32))
        memory.update(zip(missing, new))
        if disk is not None:
            _save(disk, {k: v for k, v in memory.items() if not k.startswith("__")})
    rows = torch.stack([memory[n] for n in names]) if names else torch.zeros(0, 0)
    if getattr(backend, "model", None) is not None:
        return rows.to(backend.device)
    return rows.numpy()


def cache_root(text_cache_dir: str | None = None) -> Path:
    """Where on-disk distractor embeddings go: ``text.cache_dir`` when set, else the user's cache."""
    return Path(text_cache_dir).expanduser() if text_cache_dir else user_cache_dir()


def _disk_file(backend) -> Path | None:
    """The cache file of a torch model whose CLIP weights come from a file (randomly initialised
    weights differ per build: never cached), keyed by the weights, templates and ensemble."""
    model = getattr(backend, "model", None)
    key = getattr(model, "clip_key", None)
    if key is None or "/random/" in key or not model.cfg.text.disk_cache:
        return None
    text = model.cfg.text
    digest = hashlib.sha256("\n".join([key, text.ensemble, *text.templates]).encode()).hexdigest()[:16]
    return cache_root(text.cache_dir) / f"distractors-{digest}.pt"


def _save(path: Path, data: dict) -> None:
    from .atomic import atomic_torch_save

    try:
        atomic_torch_save(data, path)
    except OSError:
        pass  # a read-only cache folder costs the next process an encode, nothing else


def _load(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:
        return {}  # a damaged cache is rebuilt, never fatal
