"""Region embeddings from an open_clip image tower: ``crop`` and ``pool`` encoders.

Every encoder maps (images, boxes in those images' pixels) to region features in the joint
image-text space, before normalisation (``RegionCLIP.embed`` normalises; a box-regression head
reads the raw features). This module is the only caller of ``roi_align``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn
from torchvision.ops import roi_align

from .batch import pad_stack
from .config import RegionConfig
from .errors import BadInput

MODES = ("crop", "pool")
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class RegionEncoder(nn.Module):
    """Base: holds the image tower and its normalisation."""

    def __init__(self, visual: nn.Module, cfg: RegionConfig):
        super().__init__()
        self.visual = visual
        self.cfg = cfg
        pre = getattr(visual, "preprocess_cfg", None) or {}
        mean, std = pre.get("mean", _OPENAI_MEAN), pre.get("std", _OPENAI_STD)
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        size = getattr(visual, "image_size", 224)
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """3xHxW in [0, 1] -> CLIP-normalised, so zero padding is the dataset mean colour."""
        return (image - self.mean) / self.std

    def forward(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """``images``: 3xHxW floats in [0, 1]; ``boxes[i]``: (Ni, 4) xyxy pixels of ``images[i]``.

        Returns (sum Ni, D) float32 features (not normalised), in image order then box order.
        """
        raise NotImplementedError

    def whole_images(self, images: list[torch.Tensor], size: int | None = None) -> torch.Tensor:
        """(B, D) image-level features (CLIP's own pooled output, not normalised): each image's
        long side fitted to ``size`` (default the tower's input size), padded to a square with
        the mean colour. A ViT runs at any size (position embedding interpolated); other towers
        only at their own."""
        size = size or self.input_size
        v = self.visual
        if size != self.input_size and not isinstance(v, VisionTransformer):
            raise BadInput(f"{type(v).__name__} image towers run at {self.input_size} px only, not {size}")
        x = torch.stack([_fit_square(self.normalize(img), size) for img in images])
        if size == self.input_size:
            return v(x).float()
        t = v.conv1(x)
        b, _, gh, gw = t.shape
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.to(t.dtype).expand(b, 1, -1), t], dim=1)
        t = v.ln_pre(t + vit_pos_embed(v, gh, gw).to(t.dtype))
        pooled, _ = v._pool(v.transformer(t))
        return (pooled @ v.proj if v.proj is not None else pooled).float()


def _fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 3xhxw -> 3 x size x size: long side to ``size``, zero (mean colour) below/right."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)[0]
    return F.pad(x, (0, size - nw, 0, size - nh))


def vit_pos_embed(visual: VisionTransformer, gh: int, gw: int) -> torch.Tensor:
    """The ViT's position embedding (class token first) for a ``gh`` x ``gw`` patch grid."""
    pos = visual.positional_embedding
    g = math.isqrt(pos.shape[0] - 1)
    if (gh, gw) == (g, g):
        return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)])


class CropEncoder(RegionEncoder):
    """Square each box on its long side, enlarge it, RoIAlign it to the tower's input size.

    Cutting from the already-normalised image means the part of an enlarged box that falls
    outside the image is the mean colour, and no region is ever centre-cropped away.
    """

    def square_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True).clamp(min=1.0)
        half = side * self.cfg.crop_scale / 2
        return torch.cat([centre - half, centre + half], dim=1)

    def crops(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """(sum Ni, 3, S, S) normalised crops.

        RoIAlign's adaptive sampling averages ceil(side / S)^2 points per output pixel, which
        antialiases but costs quadratically in the box size (a 2000 px box at S = 224 reads 100
        points per pixel). Boxes over ``4 S`` are cut from a 2x-averaged copy of the image
        instead, halved again until they fit, so no crop reads more than 16 points per pixel;
        boxes up to ``4 S`` are cut exactly as before.
        """
        s = self.input_size
        squares = [self.square_boxes(b.to(img.dtype)) for img, b in zip(images, boxes)]
        if not squares or not sum(len(q) for q in squares):
            return images[0].new_zeros((0, 3, s, s)) if images else torch.zeros((0, 3, s, s))
        sides = torch.cat([q[:, 2] - q[:, 0] for q in squares])
        levels = torch.log2(sides / (4 * s)).ceil().clamp(min=0).long()
        top = int(levels.max())  # one host read per batch, not per box
        out = sides.new_empty((len(sides), 3, s, s))
        start = 0
        for img, q in zip(images, squares):
            level = levels[start:start + len(q)]
            x = self.normalize(img)[None]
            for k in range(top + 1):
                if k:
                    x = F.avg_pool2d(x, 2, ceil_mode=True)
                pick = torch.nonzero(level == k).flatten()
                if len(pick):
                    out[start + pick] = roi_align(x, [q[pick]], (s, s), spatial_scale=1 / 2**k,
                                                  sampling_ratio=-1, aligned=True)
            start += len(q)
        return out

    def forward(self, images, boxes):
        crops = self.crops(images, boxes)
        chunks = [self.visual(c) for c in crops.split(self.cfg.crop_batch_size)] if len(crops) else []
        if not chunks:
            return crops.new_zeros((0, self.embed_dim())).float()
        return torch.cat(chunks).float()

class _DensePool(RegionEncoder):
    """Shared by the pool encoders: each image resized to detection resolution, then one
    zero-padded batch (zero is the mean colour after normalisation) and one dense pass."""

    stride = 32

    def resize(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
        """3xhxw in [0, 1] -> normalised at pool resolution, and the xyxy box scale applied: per
        axis, new size / old size (the rounded sides, so boxes land where the pixels went)."""
        h, w = image.shape[-2:]
        scale = min(self.cfg.pool_short_side / min(h, w), self.cfg.pool_max_side / max(h, w))
        nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))  # detectron2's rounding
        x = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=scale < 1)[0]
        return self.normalize(x), (nw / w, nh / h, nw / w, nh / h)

    # Whether images of different sizes may share one padded pass. Convolutions only see the
    # padding near an image's border; a ViT's attention is global, so every token would.
    pads_safely = True

    def forward(self, images, boxes):
        resized = [self.resize(img) for img in images]
        groups: dict[tuple, list[int]] = {}
        for i, (x, _) in enumerate(resized):
            groups.setdefault(tuple(x.shape) if not self.pads_safely else (), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx in groups.values():
            x = pad_stack([resized[i][0] for i in idx], self.stride)
            scaled = [boxes[i].to(x.dtype) * boxes[i].new_tensor(resized[i][1], dtype=x.dtype) for i in idx]
            if sum(len(b) for b in scaled):
                emb = self.pool(x, scaled).float()
            else:
                emb = x.new_zeros((0, self.embed_dim())).float()
            for i, e in zip(idx, emb.split([len(b) for b in scaled])):
                out[i] = e
        return torch.cat(out)

    def pool(self, x: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class ResNetPoolEncoder(_DensePool):
    """CLIP ModifiedResNet, RegionCLIP style.

    ``regionclip`` variant: stem..layer3 once, RoIAlign the stride-16 map to twice the
    attention-pool grid, then layer4 + attention pool per region. ``fast`` variant: layer4
    once, RoIAlign the stride-32 map to the pool grid, attention pool per region.
    """

    def __init__(self, visual: ModifiedResNet, cfg: RegionConfig):
        super().__init__(visual, cfg)
        if cfg.pool_variant not in ("regionclip", "fast"):
            raise BadInput(f"unknown pool variant '{cfg.pool_variant}': use regionclip or fast")
        self.grid = math.isqrt(visual.attnpool.positional_embedding.shape[0] - 1)

    def pool(self, x, boxes):
        v = self.visual
        x = v.layer3(v.layer2(v.layer1(v.stem(x))))
        if self.cfg.pool_variant == "regionclip":
            r = roi_align(x, boxes, (2 * self.grid, 2 * self.grid), spatial_scale=1 / 16,
                          sampling_ratio=-1, aligned=True)
            return v.attnpool(v.layer4(r))
        x = v.layer4(x)
        r = roi_align(x, boxes, (self.grid, self.grid), spatial_scale=1 / 32,
                      sampling_ratio=-1, aligned=True)
        return v.attnpool(r)


class ViTPoolEncoder(_DensePool):
    """CLIP ViT at detection resolution, MaskCLIP style.

    The position embedding is interpolated to the input grid; the last block keeps only its
    value path (q.k attention dropped, residual and MLP kept) so every patch token lands in
    the joint space; boxes are RoIAligned 1x1 from the projected token map. Known to be weak
    before region-level fine-tuning.
    """

    def __init__(self, visual: VisionTransformer, cfg: RegionConfig):
        super().__init__(visual, cfg)
        if visual.attn_pool is not None or getattr(visual, "final_ln_after_pool", False):
            raise BadInput("pool mode supports plain CLIP ViTs (no attention pooler): use mode crop (--mode crop)")
        if not isinstance(visual.transformer.resblocks[-1].attn, nn.MultiheadAttention):
            raise BadInput("pool mode needs nn.MultiheadAttention blocks in the ViT: use mode crop (--mode crop)")
        self.patch = visual.conv1.kernel_size[0]
        self.stride = self.patch
        self.pads_safely = False

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, D, H/p, W/p) patch embeddings in the joint space."""
        v = self.visual
        t = v.conv1(x)
        b, _, gh, gw = t.shape
        t = t.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(t.dtype).expand(b, 1, -1)
        t = torch.cat([cls, t], dim=1) + vit_pos_embed(v, gh, gw).to(t.dtype)
        t = v.ln_pre(t)
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            t = t.transpose(0, 1)
        for blk in blocks[:-1]:
            t = blk(t)
        last = blocks[-1]
        attn = last.attn
        d = attn.embed_dim
        value = F.linear(last.ln_1(t), attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
        t = t + last.ls_1(attn.out_proj(value))
        t = t + last.ls_2(last.mlp(last.ln_2(t)))
        if not batch_first:
            t = t.transpose(0, 1)
        t = v.ln_post(t[:, 1:])
        if v.proj is not None:
            t = t @ v.proj
        return t.transpose(1, 2).reshape(b, -1, gh, gw)

    def pool(self, x, boxes):
        fmap = self.tokens(x)
        r = roi_align(fmap, boxes, (1, 1), spatial_scale=1 / self.patch, sampling_ratio=-1, aligned=True)
        return r.flatten(1)


def build_region_encoder(visual: nn.Module, mode: str, cfg: RegionConfig) -> RegionEncoder:
    """Pick the encoder for ``mode`` and the tower's type."""
    if mode == "crop":
        return CropEncoder(visual, cfg)
    if mode != "pool":
        raise BadInput(f"unknown region mode '{mode}': use one of {', '.join(MODES)}")
    if isinstance(visual, ModifiedResNet):
        return ResNetPoolEncoder(visual, cfg)
    if isinstance(visual, VisionTransformer):
        return ViTPoolEncoder(visual, cfg)
    raise BadInput(f"pool mode supports CLIP ResNets and ViTs, not {type(visual).__name__}: use mode crop (--mode crop)")
