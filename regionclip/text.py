"""Label embeddings: prompt-template ensembles with an in-memory and optional on-disk cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import BadInput


def ensemble(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """(L, T, D) per-template embeddings -> (L, D): normalise, average over T, renormalise."""
    return F.normalize(F.normalize(prompt_embeddings.float(), dim=-1).mean(dim=1), dim=-1)


def check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        labels = [labels]
    labels = [str(label).strip() for label in labels]
    if not labels or not all(labels):
        raise BadInput("labels must be a non-empty list of non-empty strings, e.g. --labels \"dog,cat\"")
    return labels


class TextEncoder:
    """Embeds labels through ``templates`` with a CLIP text tower.

    ``encode_fn`` maps token ids (B, context) to (B, D) text features. ``model_key`` names the
    weights; together with the templates it keys the disk cache, so a second run with the same
    model and vocabulary encodes nothing. ``prompts_encoded`` counts text-tower work.
    """

    def __init__(
        self,
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        templates: Sequence[str],
        model_key: str,
        device: torch.device,
        chunk_size: int = 512,
        cache_dir: str | os.PathLike | None = None,
    ):
        if not templates or any("{}" not in t for t in templates):
            raise BadInput("every prompt template must contain '{}' where the label goes, e.g. 'a photo of a {}.'")
        self.encode_fn = encode_fn
        self.tokenizer = tokenizer
        self.templates = list(templates)
        self.device = device
        self.chunk_size = chunk_size
        digest = hashlib.sha256("\n".join([model_key, *self.templates]).encode()).hexdigest()[:16]
        self.cache_file = Path(cache_dir) / f"text-{digest}.pt" if cache_dir else None
        self._memory: dict[str, torch.Tensor] = {}
        self._disk_loaded = False
        self.prompts_encoded = 0

    def embed(self, labels: Sequence[str]) -> torch.Tensor:
        """(L, D) unit-norm embeddings, computed now (differentiable when grad is on; no cache)."""
        labels = check_labels(labels)
        prompts = [t.format(label) for label in labels for t in self.templates]
        feats = []
        for start in range(0, len(prompts), self.chunk_size):
            tokens = self.tokenizer(prompts[start:start + self.chunk_size]).to(self.device)
            feats.append(self.encode_fn(tokens))
        self.prompts_encoded += len(prompts)
        return ensemble(torch.cat(feats).view(len(labels), len(self.templates), -1))

    def __call__(self, labels: Sequence[str]) -> torch.Tensor:
        """(L, D) unit-norm fp32 embeddings on the encoder's device, from the cache when possible."""
        labels = check_labels(labels)
        self._load_disk()
        missing = list(dict.fromkeys(lb for lb in labels if lb not in self._memory))
        if missing:
            with torch.no_grad():
                new = self.embed(missing).cpu()
            self._memory.update(zip(missing, new))
            self._save_disk()
        return torch.stack([self._memory[lb] for lb in labels]).to(self.device)

    def clear(self) -> None:
        """Forget in-memory embeddings (after the text tower's weights change)."""
        self._memory.clear()

    def _load_disk(self) -> None:
        if self._disk_loaded or self.cache_file is None:
            return
        self._disk_loaded = True
        if self.cache_file.is_file():
            try:
                stored = torch.load(self.cache_file, map_location="cpu", weights_only=True)
            except Exception:
                return  # a damaged cache is rebuilt, never fatal
            self._memory.update(stored)

    def _save_disk(self) -> None:
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(dict(self._memory), tmp)
        os.replace(tmp, self.cache_file)
