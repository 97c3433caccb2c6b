"""A vocabulary from label embeddings stored in a file: RegionCLIP's concept files or any (N, D) tensor.

The text tower is one source of label embeddings (``text.TextEncoder``); a file written once
is another (``--text-embeddings``, ``text_embeddings=``): RegionCLIP's ``coco_65_cls_emb.pth``
holds the 65 OV-COCO names through its 81-template ensemble, un-normalised. Rows are checked
against the labels (one per label, in order) and the model's embedding width.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import BadInput, WeightsUnavailable


def _read(path: Path):
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"{path}: cannot be read as a torch tensor file ({type(exc).__name__}); "
                                 "expected a concept-embedding tensor (N, D) such as coco_65_cls_emb.pth") from None


def load_concept_embeddings(source: str | os.PathLike | torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """A concept-embedding file (or tensor) -> (N, D) float32 rows, unit-norm with ``normalize``.

    RegionCLIP stores un-normalised means and normalises them whenever it scores, so unit rows
    lose nothing. A ``(D,)`` tensor is one concept (RegionCLIP squeezes one-name files).
    """
    where = "text embeddings" if isinstance(source, torch.Tensor) else str(source)
    obj = source if isinstance(source, torch.Tensor) else _read(Path(source))
    if not isinstance(obj, torch.Tensor):
        raise WeightsUnavailable(
            f"{where}: this holds a {type(obj).__name__}, expected a concept-embedding tensor (N, D) such as "
            "coco_65_cls_emb.pth"
        )
    if obj.ndim == 1:
        obj = obj[None]
    if obj.ndim != 2 or not obj.is_floating_point() or 0 in obj.shape:
        raise WeightsUnavailable(
            f"{where}: concept embeddings must be a float tensor of shape (N, D), but got "
            f"{obj.dtype} {tuple(obj.shape)}"
        )
    emb = obj.float()
    norms = emb.norm(dim=1)
    bad = torch.nonzero(~torch.isfinite(norms) | (norms == 0)).flatten()
    if len(bad):
        raise WeightsUnavailable(f"{where}: row {int(bad[0])} of the concept embeddings is zero or not finite")
    return F.normalize(emb, dim=1) if normalize else emb


def check_concept_embeddings(emb: torch.Tensor, labels: Sequence[str], embed_dim: int | None,
                             where: str = "text embeddings") -> torch.Tensor:
    """Raise ``BadInput`` (one line) unless ``emb`` has one row per label and ``embed_dim`` columns
    (``None``: any; the count can be checked before a model is built)."""
    if len(emb) != len(labels):
        raise BadInput(
            f"{where} hold {len(emb)} embeddings but {len(labels)} labels were given: the labels file "
            "must list the names of the embedding file, one per line, in its order"
        )
    if embed_dim is not None and emb.shape[1] != embed_dim:
        raise BadInput(
            f"{where} have dimension {emb.shape[1]} but the CLIP model embeds to {embed_dim} "
            "(RN50: 1024, the plain *_cls_emb.pth files; RN50x4: 640, the *_rn50x4.pth files)"
        )
    return emb


def concept_vocabulary(source: str | os.PathLike | torch.Tensor, labels: Sequence[str],
                       embed_dim: int | None = None) -> torch.Tensor:
    """``load_concept_embeddings`` + ``check_concept_embeddings``: (L, D) unit rows for ``labels``."""
    where = "text embeddings" if isinstance(source, torch.Tensor) else f"text embeddings {source}"
    return check_concept_embeddings(load_concept_embeddings(source), labels, embed_dim, where)
