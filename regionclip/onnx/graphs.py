"""The torch modules ``export_onnx`` traces, one per graph: the parts of each stage with static
control flow (shapes that depend on the data, such as top-k and NMS, run in numpy in
``runtime.py``). The graph list and the exporter's choice are in ``export.py``'s docstring.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ..model import RegionCLIPModel as RegionCLIP
from ..regions import CropEncoder, ViTPoolEncoder
from ..scoring import region_logits

class ProposalGraph(nn.Module):
    """Backbone + RPN head: the part of the proposal stage with static control flow. With
    ``features`` (names of the backbone's maps) those maps are outputs too, for the second stage."""

    def __init__(self, detector: nn.Module, features: list[str] | None = None):
        super().__init__()
        self.backbone, self.head, self.features = detector.backbone, detector.rpn.head, features or []

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.backbone(image)
        logits, deltas = self.head(list(maps.values()))
        return (*logits, *deltas, *(maps[name] for name in self.features))


class SecondStageGraph(nn.Module):
    """The detector's second stage on given boxes (``proposals.source=refined``): multi-scale
    RoIAlign over the backbone's maps, the box head and the predictor. Boxes are in the pixels of
    the proposal graph's (unpadded) input; ``image_size`` only fixes each map's stride, which is
    the same at every input size (sides padded to multiples of 32)."""

    def __init__(self, roi_heads: nn.Module, features: list[str], image_size: tuple[int, int]):
        super().__init__()
        self.pool, self.head, self.predictor = roi_heads.box_roi_pool, roi_heads.box_head, roi_heads.box_predictor
        self.features, self.image_size = features, image_size

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *maps, boxes = args
        pooled = self.pool(dict(zip(self.features, maps)), [boxes], [self.image_size])
        return self.predictor(self.head(pooled))


def _region_outputs(raw: torch.Tensor, box_head: nn.Module | None):
    """(N, D) raw region features -> unit embeddings, and with a box head its (N, 4) deltas read
    from the raw features, as ``BoxRefiner.refine`` reads them."""
    embeddings = F.normalize(raw, dim=-1)
    if box_head is None:
        return embeddings
    return embeddings, box_head(raw.to(box_head.bbox_pred.weight.dtype)).float()


class CropGraph(nn.Module):
    """(1, 3, H, W) CLIP-normalised image + (N, 4) xyxy boxes in its pixels -> (N, D) unit
    embeddings of the RoIAligned crops (``CropEncoder.crops`` for one pyramid level) [, (N, 4)
    box-head deltas]."""

    def __init__(self, encoder: CropEncoder, box_head: nn.Module | None = None):
        super().__init__()
        self.visual, self.size, self.box_head = encoder.visual, encoder.input_size, box_head

    def forward(self, image: torch.Tensor, boxes: torch.Tensor):
        crops = roi_align(image, [boxes], (self.size, self.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return _region_outputs(self.visual(crops).float(), self.box_head)


class PoolGraph(nn.Module):
    """(1, 3, H, W) normalised image at pool resolution, padded + (N, 4) boxes in its pixels ->
    (N, D) unit embeddings (the encoder's ``pool``) [, (N, 4) box-head deltas]."""

    def __init__(self, encoder: nn.Module, box_head: nn.Module | None = None):
        super().__init__()
        self.encoder, self.box_head = encoder, box_head

    def forward(self, image: torch.Tensor, boxes: torch.Tensor):
        return _region_outputs(self.encoder.pool(image, [boxes]).float(), self.box_head)

    @contextlib.contextmanager
    def traceable(self):
        """While exporting, a ViT's attention blocks (all but the last, whose value path
        ``ViTPoolEncoder`` runs itself) compute the same attention without fixing the token count:
        here the token count follows the image size, and the tracer bakes it into
        ``nn.MultiheadAttention``'s reshapes (the graph then fails at any other size)."""
        if not isinstance(self.encoder, ViTPoolEncoder):
            yield
            return
        blocks = list(self.encoder.visual.transformer.resblocks[:-1])
        saved = [blk.attn for blk in blocks]
        try:
            for blk in blocks:
                blk.attn = _SelfAttention(blk.attn)
            yield
        finally:
            for blk, attn in zip(blocks, saved):
                blk.attn = attn


class _SelfAttention(nn.Module):
    """``nn.MultiheadAttention(x, x, x, need_weights=False)`` with the same weights and operations
    (packed input projection, scaled dot-product attention, output projection), written with
    only the batch size taken from the input's shape."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        m = self.mha
        x = query if m.batch_first else query.transpose(0, 1)
        b = x.shape[0]
        qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(b, -1, 3, m.num_heads, m.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = m.out_proj(out.transpose(1, 2).reshape(b, -1, m.embed_dim))
        return (out if m.batch_first else out.transpose(0, 1)), None


class TextGraph(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens).float()


class ScoringGraph(nn.Module):
    """``region_logits`` + softmax. Without a learned background the zero embedding stands in,
    which gives the zero column exactly and keeps N out of the graph's constants."""

    def __init__(self, model: RegionCLIP):
        super().__init__()
        self.scale = model.logit_scale
        self.background = model.cfg.scoring.background
        bg = model.background_embedding
        self.register_buffer("bg", bg.float().reshape(1, -1) if bg is not None
                             else torch.zeros(1, model.regions.embed_dim(), device=model.device))

    def forward(self, regions: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = region_logits(regions, text, self.scale, self.background, self.bg)
        return logits, logits.softmax(dim=-1)[:, : text.shape[0]]
