"""Compiling a ``Vocabulary``: prompts through the text tower, exemplars through the region encoder.

An exemplar is embedded exactly as a detection's region is (the backend's ``embed_exemplars``:
``RegionCLIPModel.embed`` on the exemplar image's box, or the ONNX export's region graph), so
it lands in the space the regions are scored in. Each class's embedding is
``normalise((1 - w) * text + w * exemplars)`` with ``text`` the normalised mean of its
prompts' (template-ensembled, unit) embeddings, ``exemplars`` the normalised mean of its unit
exemplar embeddings and ``w = vocabulary.EXEMPLAR_WEIGHT``; a class with only one side uses it
alone. Negatives are embedded as text and follow the classes' rows.

Exemplar embeddings are cached per backend (in memory) and, for a torch model with a text
cache folder (``text.cache_dir``), on disk beside the text cache, keyed by the model's weights
and region settings, the image file's content and the box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadInput
from .vocabulary import EXEMPLAR_WEIGHT, Vocabulary


@dataclass(frozen=True)
class VocabRules:
    """What scoring needs beyond the embeddings: the rows after the classes are ``num_negatives``
    negatives, then ``num_distractors`` distractors (``distractors``; a box whose best row is one
    of either is dropped), and per-class ``thresholds`` (None: the global score threshold)."""

    num_negatives: int = 0
    thresholds: tuple[float | None, ...] = ()
    num_distractors: int = 0

    @property
    def extra(self) -> int:
        """Rows after the classes: negatives and distractors, scored alike and never reported."""
        return self.num_negatives + self.num_distractors

    def threshold_list(self, default: float, num_classes: int) -> list[float]:
        """One score threshold per class: its own where set, ``default`` elsewhere."""
        given = list(self.thresholds) + [None] * (num_classes - len(self.thresholds))
        return [default if t is None else float(t) for t in given[:num_classes]]

    @property
    def active(self) -> bool:
        return self.extra > 0 or any(t is not None for t in self.thresholds)


@dataclass
class CompiledVocabulary:
    """``names`` (C classes, the detections' labels), ``embeddings`` ((C + M, D) unit rows: classes,
    then the M ``negatives``; a torch tensor or, from the ONNX backend, a numpy array) and ``rules``."""

    vocabulary: Vocabulary
    names: list[str]
    negatives: list[str]
    embeddings: torch.Tensor | np.ndarray
    rules: VocabRules | None


def combine(text: torch.Tensor | None, exemplars: torch.Tensor | None, weight: float = EXEMPLAR_WEIGHT) -> torch.Tensor:
    """A class's (D,) unit embedding from its (P, D) prompt and (E, D) exemplar embeddings
    (either may be None or empty): each side normalised, mean, renormalised; then
    ``normalise((1 - weight) * text + weight * exemplars)``, or the one side present."""
    sides = [F.normalize(F.normalize(x.float(), dim=-1).mean(0), dim=-1) if x is not None and len(x) else None
             for x in (text, exemplars)]
    if sides[0] is None and sides[1] is None:
        raise BadInput("a class needs prompts or exemplars to embed")
    if sides[1] is None:
        return sides[0]
    if sides[0] is None:
        return sides[1]
    return F.normalize((1 - weight) * sides[0] + weight * sides[1], dim=-1)


def compile_vocabulary(vocab: Vocabulary, backend) -> CompiledVocabulary:
    """Embed ``vocab`` with ``backend`` (``TorchBackend`` or ``OnnxDetector``): one text pass over
    every distinct prompt and negative, one region pass per exemplar image (cached)."""
    prompts = list(dict.fromkeys([p for c in vocab.classes for p in c.text_prompts] + vocab.negatives))
    text = _torch(backend.encode_text(prompts)) if prompts else None
    row = {p: i for i, p in enumerate(prompts)}
    ex_emb = exemplar_embeddings(backend, [e for c in vocab.classes for e in c.exemplars])
    rows, k = [], 0
    for c in vocab.classes:
        t = text[[row[p] for p in c.text_prompts]] if c.text_prompts else None
        e = torch.stack(ex_emb[k:k + len(c.exemplars)]) if c.exemplars else None
        k += len(c.exemplars)
        # One prompt alone is used as encoded, so a names-only vocabulary scores as plain labels do.
        rows.append(t[0] if e is None and len(t) == 1 else combine(t, e))
    rows += [text[row[n]] for n in vocab.negatives]
    emb = torch.stack(rows).float()
    if emb.shape[1] != _embed_dim(backend):
        raise BadInput(f"exemplar or text embeddings have dimension {emb.shape[1]} but the model embeds to "
                       f"{_embed_dim(backend)}")
    rules = VocabRules(len(vocab.negatives), tuple(vocab.thresholds))
    out = emb.to(backend.device) if hasattr(backend, "model") else emb.numpy()  # the ONNX runtime scores numpy
    return CompiledVocabulary(vocab, vocab.names, vocab.negatives, out, rules if rules.active else None)


def exemplar_embeddings(backend, exemplars: Sequence) -> list[torch.Tensor]:
    """(D,) unit float32 CPU embeddings, one per ``Exemplar``, in order; images grouped, cached."""
    memory = backend.__dict__.setdefault("_exemplar_memory", {})
    disk = _disk_cache(backend)
    if disk is not None and not memory.get("__disk_loaded__"):
        memory.update(disk.load())
        memory["__disk_loaded__"] = True
    out: list = [None] * len(exemplars)
    todo: dict = {}  # image key -> (image, [(index, cache key, box)])
    for i, ex in enumerate(exemplars):
        if ex.embedding is not None:
            out[i] = F.normalize(torch.as_tensor(np.asarray(ex.embedding, dtype=np.float32)).reshape(-1), dim=0)
            continue
        key = ex.key()
        if key in memory:
            out[i] = memory[key]
            continue
        img = key.split(":")[0] if not _is_path(ex.image) else str(ex.image)
        todo.setdefault(img, (ex.image, []))[1].append((i, key, ex.box_xyxy))
    groups = list(todo.values())
    boxes = [np.asarray([b for _, _, b in items], dtype=np.float32) for _, items in groups]
    many = getattr(backend, "embed_exemplar_images", None)  # batches images where the backend can
    embs = many([(image, b) for (image, _), b in zip(groups, boxes)]) if many and groups else [
        backend.embed_exemplars(image, b) for (image, _), b in zip(groups, boxes)]
    for (_, items), emb in zip(groups, embs):
        for (i, key, _), e in zip(items, F.normalize(_torch(emb).float().cpu(), dim=-1)):
            out[i] = memory[key] = e
    if todo and disk is not None:
        disk.save({k: v for k, v in memory.items() if k != "__disk_loaded__"})
    return out


class _Disk:
    def __init__(self, path):
        self.path = path

    def load(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            return dict(torch.load(self.path, map_location="cpu", weights_only=True))
        except Exception:
            return {}  # a damaged cache is rebuilt, never fatal

    def save(self, data: dict) -> None:
        from .atomic import atomic_torch_save

        atomic_torch_save(data, self.path)


def _disk_cache(backend) -> _Disk | None:
    """Beside the text cache (a torch model with ``text.cache_dir``), one file per ``_embedding_key``."""
    import hashlib

    model = getattr(backend, "model", None)
    text_file = getattr(getattr(model, "text", None), "cache_file", None)
    if text_file is None:
        return None
    digest = hashlib.sha256(_embedding_key(model).encode()).hexdigest()[:16]
    return _Disk(text_file.parent / f"exemplars-{digest}.pt")


def _embedding_key(model) -> str:
    """Everything an exemplar's embedding depends on besides its image and box: the CLIP weights
    (a checkpoint's file among them), the region mode and settings (crop scale, pool sizes), the
    largest side images are decoded to, and the precision the region encoder runs at."""
    cfg = model.cfg
    return "\n".join(map(str, (model.clip_key, cfg.clip_model, cfg.mode, repr(cfg.regions), cfg.input_max_side,
                                cfg.precision)))


def _is_path(x) -> bool:
    import os

    return isinstance(x, (str, os.PathLike))


def _torch(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _embed_dim(backend) -> int:
    model = getattr(backend, "model", None)
    return model.regions.embed_dim() if model is not None else int(backend.embed_dim)
