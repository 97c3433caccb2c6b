"""Label embeddings: prompt-template ensembles, short text contexts, and an embedding cache.

Short contexts: a CLIP text tower pads every prompt to 77 tokens, yet with a causal mask a token
never sees the ones after it, so the pooled end-of-text token of a 10-token prompt is the same
whether 67 pad tokens follow it or none. ``encode_text_truncated`` runs each batch only up to its
longest prompt, and shares the states of a token prefix common to the whole batch (``"<start> a
photo of a"``), which ``TextEncoder`` arranges by batching prompts by template, then by length.
Towers of another layout (Hugging Face, class-token or attention pooling, bidirectional masks)
keep the full-context path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, Transformer
from torch import nn

from .atomic import atomic_torch_save
from .errors import BadInput
from .labels import check_labels  # also importable from here, as before

# Pools that read one token at or before the end of text; "last" and "none" read the padding too.
_SHORT_POOLS = ("argmax", "eos", "first")


def tokenizer_for(clip_model: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for an architecture, built once per process and shared by its models:
    reading the BPE merges takes 75 ms, which every model built paid again (each server or Ray
    actor start, the test suite's 200 models). Keyed by the architecture's text settings as well,
    so a name registered again with others gets its own; hub and local-dir names are not cached
    (finding their settings may read files)."""
    if ":" in clip_model:
        return open_clip.get_tokenizer(clip_model)
    text_cfg = (open_clip.get_model_config(clip_model) or {}).get("text_cfg", {})
    return _tokenizer(clip_model, json.dumps(text_cfg, sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _tokenizer(clip_model: str, text_cfg: str) -> Callable[[list[str]], torch.Tensor]:
    return open_clip.get_tokenizer(clip_model)


def ensemble(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """(L, T, D) per-template embeddings -> (L, D): normalise, average over T, renormalise."""
    return F.normalize(F.normalize(prompt_embeddings.float(), dim=-1).mean(dim=1), dim=-1)


def _text_tower(clip: nn.Module) -> tuple[nn.Module, str, int | None] | None:
    """(module holding the tower's parts, pool type, eos id) where the layout is one this file
    reproduces exactly: open_clip's ``CLIP.encode_text`` or a ``CustomTextCLIP`` over a plain
    causal ``TextTransformer``. None otherwise (the caller then keeps the full context)."""
    encode_text = getattr(type(clip), "encode_text", None)
    if encode_text is CLIP.encode_text:
        owner, pool, eos = clip, getattr(clip, "text_pool_type", None), getattr(clip, "text_eos_id", None)
    elif encode_text is CustomTextCLIP.encode_text and type(clip.text).forward is TextTransformer.forward:
        owner, pool, eos = clip.text, clip.text.pool_type, getattr(clip.text, "eos_id", None)
        extras = (getattr(owner, "cls_emb", None) is not None, getattr(owner, "use_pad_mask", False),
                  getattr(owner, "output_tokens", False))
        if any(extras):  # a class token, a padding mask or token outputs change what is returned
            return None
    else:
        return None
    mask = getattr(owner, "attn_mask", None)
    if pool not in _SHORT_POOLS or mask is None or not getattr(owner.transformer, "batch_first", False):
        return None
    causal = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    if not torch.equal(torch.isneginf(mask), causal) or mask.masked_fill(causal, 0).any():
        return None  # not the standard causal mask: later tokens may influence earlier ones
    return owner, pool, eos


def supports_short_context(clip: nn.Module | None) -> bool:
    """Whether ``encode_text_truncated`` reproduces ``clip.encode_text`` for this model."""
    return isinstance(clip, nn.Module) and _text_tower(clip) is not None


def context_lengths(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) tokens each prompt needs: up to and including the token the tower pools.

    ``tokens`` (B, context) are the tokenizer's ids; raises ``BadInput`` for unsupported towers.
    """
    return _context_lengths(_require_tower(clip), tokens)


def encode_text_truncated(clip: nn.Module, tokens: torch.Tensor, share_prefix: bool = True) -> torch.Tensor:
    """``clip.encode_text(tokens)`` computed on the shortest context that gives the same result.

    tokens: (B, context) token ids, on any device (on the CPU the length bookkeeping needs no
    host sync). Returns (B, D) unnormalised text features on the model's device, equal to the
    full-context ones up to float rounding, with gradients and under the caller's autocast.
    The batch is cut to its longest prompt (positional embedding and causal mask sliced); with
    ``share_prefix`` the leading tokens common to every row run once instead of B times.
    Raises ``BadInput`` where ``supports_short_context(clip)`` is False.
    """
    tower = _require_tower(clip)
    owner = tower[0]
    pooled = _context_lengths(tower, tokens) - 1
    length = int(pooled.max()) + 1
    shared = _common_prefix(tokens[:, :length], int(pooled.min())) if share_prefix else 0
    device = owner.token_embedding.weight.device
    tokens, pooled = tokens[:, :length].to(device), pooled.to(device)
    cast_dtype = owner.transformer.get_cast_dtype()
    x = owner.token_embedding(tokens).to(cast_dtype) + owner.positional_embedding[:length].to(cast_dtype)
    mask = owner.attn_mask[:length, :length]
    if shared >= 2 and _blocks_shareable(owner.transformer):
        x = _transformer_shared_prefix(owner.transformer, x, mask, shared)
    else:
        x = owner.transformer(x, attn_mask=mask)
    # open_clip's text_global_pool after ln_final; the norm is per token, so pool first.
    x = owner.ln_final(x[torch.arange(len(x), device=device), pooled])
    proj = owner.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _require_tower(clip: nn.Module) -> tuple[nn.Module, str, int | None]:
    tower = _text_tower(clip)
    if tower is None:
        raise BadInput(f"{type(clip).__name__} has no causal open_clip text tower; call its encode_text instead")
    return tower


def _context_lengths(tower: tuple[nn.Module, str, int | None], tokens: torch.Tensor) -> torch.Tensor:
    _, pool, eos = tower
    if pool == "argmax":  # end of text has the largest id; argmax returns the first maximum
        pos = tokens.argmax(dim=-1)
    elif pool == "eos":
        pos = (tokens == eos).int().argmax(dim=-1)
    else:  # first
        pos = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    return pos + 1


def _common_prefix(tokens: torch.Tensor, limit: int) -> int:
    """Leading columns equal in every row, at most ``limit`` (so each pooled token stays unshared)."""
    if len(tokens) < 2:
        return 0
    same = (tokens == tokens[:1]).all(dim=0).int().cumprod(dim=0)
    return min(int(same.sum()), limit)


def _blocks_shareable(transformer: nn.Module) -> bool:
    """The transformer is open_clip's stack of plain self-attention blocks (what the prefix path redoes)."""
    if type(transformer).forward is not Transformer.forward or transformer.grad_checkpointing:
        return False
    for blk in transformer.resblocks:
        attn = blk.attn
        if type(blk) is not ResidualAttentionBlock or type(attn) is not nn.MultiheadAttention:
            return False
        if hasattr(blk, "ln_1_kv"):  # a cross-attention block
            return False
        if not (attn.batch_first and attn._qkv_same_embed_dim) or attn.bias_k is not None or attn.add_zero_attn:
            return False
        if attn.training and attn.dropout > 0:
            return False
    return True


def _transformer_shared_prefix(
    transformer: nn.Module, x: torch.Tensor, mask: torch.Tensor, shared: int
) -> torch.Tensor:
    """``transformer(x, attn_mask=mask)`` for (B, L, D) ``x`` whose first ``shared`` rows are equal.

    The prefix runs as one sequence; each block's suffix queries attend to its keys and values.
    """
    prefix, suffix = x[:1, :shared], x[:, shared:]
    for blk in transformer.resblocks:
        attn = blk.attn

        def qkv(h: torch.Tensor) -> list[torch.Tensor]:  # (N, S, D) -> 3 x (N, heads, S, D / heads)
            out = F.linear(blk.ln_1(h), attn.in_proj_weight, attn.in_proj_bias)
            return [t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in out.chunk(3, dim=-1)]

        (qp, kp, vp), (qs, ks, vs) = qkv(prefix), qkv(suffix)
        m = mask.to(qs.dtype)
        k = torch.cat([kp.expand(len(suffix), -1, -1, -1), ks], dim=2)
        v = torch.cat([vp.expand(len(suffix), -1, -1, -1), vs], dim=2)
        out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m[:shared, :shared])
        out_s = F.scaled_dot_product_attention(qs, k, v, attn_mask=m[shared:])
        prefix = prefix + blk.ls_1(attn.out_proj(out_p.transpose(1, 2).flatten(2)))
        suffix = suffix + blk.ls_1(attn.out_proj(out_s.transpose(1, 2).flatten(2)))
        prefix = prefix + blk.ls_2(blk.mlp(blk.ln_2(prefix)))
        suffix = suffix + blk.ls_2(blk.mlp(blk.ln_2(suffix)))
    return torch.cat([prefix.expand(len(suffix), -1, -1), suffix], dim=1)


class TextEncoder:
    """Embeds labels through ``templates`` with a CLIP text tower.

    ``encode_fn`` maps token ids (B, context) to (B, D) text features. ``model_key`` names the
    weights; together with the templates it keys the disk cache, so a second run with the same
    model and vocabulary encodes nothing. ``prompts_encoded`` counts text-tower work.
    Where ``encode_fn`` is the bound ``encode_text`` of an open_clip model whose tower allows it
    (``supports_short_context``), prompts run at short contexts (``encode_text_truncated``), with
    the same embeddings; ``short_context=False`` or any other ``encode_fn`` keeps the full context.
    ``max_entries`` bounds the labels kept in memory (least recently used dropped first; the disk
    cache, written from memory, then holds those too); ``None`` keeps every label, as a run over a
    fixed vocabulary wants and a server taking labels from its clients must not. ``read_only``
    reads the disk cache and never writes it.
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
        short_context: bool = True,
        max_entries: int | None = None,
    ):
        if not templates or any("{}" not in t for t in templates):
            raise BadInput("every prompt template must contain '{}' where the label goes, e.g. 'a photo of a {}.'")
        self.encode_fn = encode_fn
        self.tokenizer = tokenizer
        self.templates = list(templates)
        self.device = device
        self.chunk_size = chunk_size
        self.short_context = short_context
        digest = hashlib.sha256("\n".join([model_key, *self.templates]).encode()).hexdigest()[:16]
        self.cache_file = Path(cache_dir) / f"text-{digest}.pt" if cache_dir else None
        self.max_entries = max_entries
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._disk_loaded = False
        self.read_only = False
        self.prompts_encoded = 0

    def embed(self, labels: Sequence[str]) -> torch.Tensor:
        """(L, D) unit-norm embeddings, computed now (differentiable when grad is on; no cache)."""
        labels = check_labels(labels)
        prompts = [t.format(label) for label in labels for t in self.templates]
        # Short contexts reproduce open_clip's own encode_text only: encode_fn must be that method.
        clip = getattr(self.encode_fn, "__self__", None)
        own = getattr(self.encode_fn, "__func__", None) is getattr(type(clip), "encode_text", False)
        if self.short_context and own and supports_short_context(clip):
            feats = self._encode_short(clip, prompts)
        else:
            feats = torch.cat([
                self.encode_fn(self.tokenizer(prompts[start:start + self.chunk_size]).to(self.device))
                for start in range(0, len(prompts), self.chunk_size)
            ])
        self.prompts_encoded += len(prompts)
        return ensemble(feats.view(len(labels), len(self.templates), -1))

    def _encode_short(self, clip: nn.Module, prompts: list[str]) -> torch.Tensor:
        """(P, D) features in prompt order. A batch holds prompts of one template only (so it
        shares the template's prefix), sorted by token length (so it is cut to a near-common
        length); a template's prompts split into equal batches of at most ``chunk_size``."""
        tokens = self.tokenizer(prompts)  # stays on the CPU: the bookkeeping needs no host sync
        lengths = context_lengths(clip, tokens).view(-1, len(self.templates))  # prompts are label-major
        order = torch.argsort(lengths.T, dim=1, stable=True) * len(self.templates)
        order += torch.arange(len(self.templates))[:, None]  # (T, L): prompt indices, a template a row
        batches = [idx for row in order for idx in row.tensor_split(-(-len(row) // self.chunk_size))]
        feats = torch.cat([encode_text_truncated(clip, tokens[idx]) for idx in batches])
        return feats[torch.argsort(torch.cat(batches)).to(feats.device)]

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
        out = torch.stack([self._memory[lb] for lb in labels]).to(self.device)
        for lb in labels:
            self._memory.move_to_end(lb)
        while self.max_entries is not None and len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)
        return out

    def clear(self) -> None:
        """Forget in-memory embeddings (after the text tower's weights change) and stop using the
        disk cache: its key names the weights this encoder was built with, and a training run's
        validation must neither read those embeddings nor store its own under that key."""
        self._memory.clear()
        self.cache_file = None

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
        if self.cache_file is None or self.read_only:
            return
        try:
            atomic_torch_save(dict(self._memory), self.cache_file)
        except OSError as exc:  # a read-only or full cache folder costs speed, not the run
            warnings.warn(f"text embeddings not cached ({exc}); set text.cache_dir or text.disk_cache=false",
                          stacklevel=2)
            self.cache_file = None


def regionclip_prompts(label: str, templates: Sequence[str]) -> list[str]:
    """RegionCLIP's prompts for one name (``prompt_engineering``: drops ',' and reads '+' as ' ')."""
    name = label.replace(",", "").replace("+", " ")
    return [t.replace("{}", name) for t in templates]


class RegionCLIPTextEncoder(TextEncoder):
    """``TextEncoder`` (same cache, same interface) whose ensemble is RegionCLIP's
    (``text.ensemble: regionclip``): per label, the raw features of its prompts averaged, then
    normalised; names cleaned as ``regionclip_prompts`` does. With RegionCLIP's 81 templates it
    reproduces its concept files (``extract_concept_features.py``) up to the rows' norm."""

    def __init__(self, *args, model_key: str, **kwargs):
        # A key of its own: the same weights and templates give other embeddings than the default ensemble.
        super().__init__(*args, model_key=f"{model_key}/regionclip-ensemble", **kwargs)

    def embed(self, labels: Sequence[str]) -> torch.Tensor:
        labels = check_labels(labels)
        prompts = [p for label in labels for p in regionclip_prompts(label, self.templates)]
        feats = torch.cat([
            self.encode_fn(self.tokenizer(prompts[start:start + self.chunk_size]).to(self.device)).float()
            for start in range(0, len(prompts), self.chunk_size)
        ])
        self.prompts_encoded += len(prompts)
        return F.normalize(feats.view(len(labels), len(self.templates), -1).mean(dim=1), dim=-1)


# text.ensemble -> encoder class
ENSEMBLES = {"normalized": TextEncoder, "regionclip": RegionCLIPTextEncoder}
