"""Short text contexts: the truncated tower equals the full 77-token one, in order, with gradients."""

from __future__ import annotations

import types

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIGS, TINY_TEXT
from regionclip.config import DEFAULT_TEMPLATES
from regionclip.text import TextEncoder, context_lengths, encode_text_truncated, supports_short_context
from regionclip.weights import register_clip_config

# Text-tower variants, all on the tiny vision tower; "custom" ones build a CustomTextCLIP.
_VISION = TINY_CONFIGS["test-vit-tiny"]["vision_cfg"]
VARIANTS = {
    "custom-argmax": {"custom_text": True, "text_cfg": {**TINY_TEXT, "proj_bias": True}},
    "custom-eos": {"custom_text": True, "text_cfg": {**TINY_TEXT, "pool_type": "eos", "eos_id": 49407}},
    "custom-blocks": {"custom_text": True, "text_cfg": {**TINY_TEXT, "qk_norm": True, "ls_init_value": 0.5}},
    "layerscale": {"text_cfg": {**TINY_TEXT, "ls_init_value": 0.5}},
    # Layouts short contexts must leave alone: pooling or attention that sees the padding.
    "siglip-like": {"custom_text": True, "text_cfg": {**TINY_TEXT, "no_causal_mask": True, "pool_type": "last"}},
    "last-pool": {"custom_text": True, "text_cfg": {**TINY_TEXT, "pool_type": "last"}},
    "bidirectional": {"custom_text": True, "text_cfg": {**TINY_TEXT, "no_causal_mask": True}},
    "cls-token": {"custom_text": True, "text_cfg": {**TINY_TEXT, "embed_cls": True}},
}
for _name, _cfg in VARIANTS.items():
    register_clip_config(f"test-text-{_name}", {"embed_dim": 32, "vision_cfg": _VISION, **_cfg})
SUPPORTED = ["test-vit-tiny", "test-rn-tiny"]
SUPPORTED += [f"test-text-{n}" for n in ("custom-argmax", "custom-eos", "custom-blocks", "layerscale")]
UNSUPPORTED = [f"test-text-{n}" for n in ("siglip-like", "last-pool", "bidirectional", "cls-token")]

TOKENIZER = open_clip.get_tokenizer("test-vit-tiny")
CPU = torch.device("cpu")
# Lengths 3..77 tokens; the last is cut to the full context by the tokenizer (end of text at 76).
# Templates with and without a shared prefix ("<start> a"), and text after the label.
TEMPLATES = [DEFAULT_TEMPLATES[0], "there is a {} in the scene.", "a {}"]
LABELS = ["dog", "traffic light", "a", "hot-air balloon with red and white stripes", "sofa", "x " * 100]


def clip_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    # Random init leaves some text parameters at 0 or 1; perturb them all so nothing hides an error.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def encoder(model: torch.nn.Module, short: bool, chunk_size: int = 4) -> TextEncoder:
    """chunk_size 4 < the prompt count, so batches are cut at different lengths."""
    return TextEncoder(model.encode_text, TOKENIZER, TEMPLATES, model_key="test", device=CPU,
                       chunk_size=chunk_size, short_context=short)


def record_lengths(model: torch.nn.Module) -> tuple[list[int], object]:
    """Sequence lengths the first block's ln_1 sees (every token row, however the block runs)."""
    transformer = model.transformer if hasattr(model, "transformer") else model.text.transformer
    seen: list[int] = []
    handle = transformer.resblocks[0].ln_1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    return seen, handle


def test_labels_cover_short_and_full_context():
    tokens = TOKENIZER([t.format(lb) for lb in LABELS for t in TEMPLATES])
    lengths = context_lengths(clip_model("test-vit-tiny"), tokens)
    assert lengths.min() == 4 and lengths.max() == 77 and len(lengths.unique()) > 5


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("name", SUPPORTED)
def test_truncated_equals_full_context(name, share_prefix):
    model = clip_model(name)
    assert supports_short_context(model)
    # One batch with a common prefix ("<start> a photo of a"), one without, one with the 77-token prompt.
    for prompts in (
        [f"a photo of a {lb}." for lb in LABELS[:5]],
        ["there is a dog.", "a cat", "an old photo of a tree in winter."],
        [f"a photo of a {lb}." for lb in LABELS],
    ):
        tokens = TOKENIZER(prompts)
        with torch.no_grad():
            full = F.normalize(model.encode_text(tokens), dim=-1)
            short = F.normalize(encode_text_truncated(model, tokens, share_prefix=share_prefix), dim=-1)
        torch.testing.assert_close(short, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["test-vit-tiny", "test-rn-tiny", "test-text-custom-eos"])
def test_encoder_short_equals_full_in_order(name):
    model = clip_model(name)
    with torch.no_grad():
        seen, handle = record_lengths(model)
        full = encoder(model, short=False).embed(LABELS)
        assert set(seen) == {77}, "short_context=False must keep the full context"
        seen.clear()
        short_enc = encoder(model, short=True)
        short = short_enc.embed(LABELS)
        reversed_short = short_enc.embed(LABELS[::-1])
    handle.remove()
    torch.testing.assert_close(short, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(reversed_short, full.flip(0), atol=1e-5, rtol=0)
    assert min(seen) < 10 and max(seen) < 77, f"blocks saw sequence lengths {seen}"
    assert short_enc.prompts_encoded == 2 * len(LABELS) * len(TEMPLATES)


def test_gradients_equal_full_context():
    grads = []
    for short in (False, True):
        model = clip_model("test-vit-tiny")
        model.train()
        emb = encoder(model, short).embed(LABELS[:4])
        (emb * torch.linspace(-1, 1, emb.shape[-1])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    full, short = grads
    assert "token_embedding.weight" in short and "transformer.resblocks.0.attn.in_proj_weight" in short
    assert full.keys() == short.keys()
    for n in full:
        torch.testing.assert_close(short[n], full[n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_runs_under_autocast_with_gradients():
    model = clip_model("test-vit-tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = encoder(model, short=False).embed(LABELS[:3])
        short = encoder(model, short=True).embed(LABELS[:3])
    assert short.requires_grad
    torch.testing.assert_close(short, full, atol=3e-2, rtol=0)  # bf16 rounding, not a different model


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_tower_keeps_full_context(name):
    model = clip_model(name)
    assert not supports_short_context(model)
    with torch.no_grad():
        want = encoder(model, short=False).embed(LABELS)
        seen, handle = record_lengths(model)
        got = encoder(model, short=True).embed(LABELS)
    handle.remove()
    assert torch.equal(got, want)
    assert seen and set(seen) <= {77, 78}, seen  # 78: the class token appended


def test_other_encode_fn_keeps_full_context():
    """Only open_clip's own encode_text is reproduced; a wrapper or an override runs as given."""
    model = clip_model("test-vit-tiny")
    wrapped = TextEncoder(lambda t: model.encode_text(t) * 2, TOKENIZER, ["a {}"], "test", CPU)

    class Doubled(open_clip.model.CLIP):
        def encode_text(self, text, normalize=False):
            return super().encode_text(text, normalize) * 2

    other = clip_model("test-vit-tiny")
    other.__class__ = Doubled
    overridden = TextEncoder(other.encode_text, TOKENIZER, ["a {}"], "test", CPU)
    assert not supports_short_context(other) and not supports_short_context(None)
    # A method bound to a supported model, but not its encode_text.
    def doubled(self, text):
        return open_clip.model.CLIP.encode_text(self, text) * 2

    bound = TextEncoder(types.MethodType(doubled, model), TOKENIZER, ["a {}"], "test", CPU)
    for enc, m in ((wrapped, model), (overridden, other), (bound, model)):
        seen, handle = record_lengths(m)
        with torch.no_grad():
            enc.embed(LABELS[:2])
        handle.remove()
        assert set(seen) == {77}


def test_disk_cache_is_not_poisoned_when_the_tower_changes(tmp_path):
    """After ``clear()`` (the tower's weights changed, e.g. a validation during training) the
    encoder neither reads the embeddings stored under its build-time key nor writes new ones
    there: a fresh encoder with that key still gets the original weights' embeddings."""
    scale = {"value": 1.0}

    def encode(tokens):  # a "tower" whose weights change with scale
        return torch.nn.functional.one_hot(tokens[:, 1] % 8, 8).float() + scale["value"] * torch.arange(8.0)

    def build():
        return TextEncoder(encode, TOKENIZER, ["a {}"], "weights-v1", CPU, cache_dir=tmp_path)

    before = build()(["cat", "dog"])
    scale["value"] = -3.0  # training moved the tower
    trained = build()
    trained.clear()
    after = trained(["cat", "dog"])
    assert not torch.allclose(after, before)  # computed with the new weights, not read from disk
    scale["value"] = 1.0
    fresh = build()
    fresh.encode_fn = lambda t: (_ for _ in ()).throw(AssertionError("should come from the cache"))
    torch.testing.assert_close(fresh(["cat", "dog"]), before)
