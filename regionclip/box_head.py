"""Box refinement: class-agnostic box deltas read from raw region features.

A detector's second stage moves each proposal a little towards the object it overlaps. Here that
is one small module over what the region encoder already computed: ``deltas = head(features)``
from the RAW (un-normalised) region features, decoded onto the region's box with torchvision's
``BoxCoder(weights=(10, 10, 5, 5))`` (Fast R-CNN's and detectron2's ``Box2BoxTransform``: the
same decode, the same ``log(1000 / 16)`` clamp on the size deltas), then clipped to the image.

RegionCLIP's fine-tuned detectors carry such a head (``roi_heads.box_predictor.bbox_pred``, one
linear layer on the attention-pool output); ``RegionCLIP`` holds it as ``self.box_head`` (None
when a checkpoint has none) and applies it when ``regions.box_refinement`` is on. A head trained
for regionclip's own models fits the same slot: anything mapping (N, D) features to (N, 4) deltas.
regionclip's trained heads may put one hidden layer (``mlp``) before ``bbox_pred``: a tiny CLIP's
64-dimensional embedding is a narrow input for a linear read-out of four offsets.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import clip_boxes_to_image

from .errors import WeightsUnavailable

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # (dx, dy, dw, dh) scales: MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS


class BoxRefiner(nn.Module):
    """(N, D) raw region features -> (N, 4) deltas (dx, dy, dw, dh); ``refine`` applies them.

    The state dict keys are RegionCLIP's (``bbox_pred.weight`` (4, D), ``bbox_pred.bias`` (4,)),
    so its fine-tuned predictor loads as it is stored.
    """

    def __init__(self, embed_dim: int, hidden: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.bbox_pred = nn.Linear(hidden or embed_dim, 4)
        self.coder = BoxCoder(BOX_CODER_WEIGHTS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.bbox_pred(self.mlp(features))

    def targets(self, boxes_xyxy: torch.Tensor, matched_xyxy: torch.Tensor) -> torch.Tensor:
        """(N, 4) deltas that move ``boxes_xyxy`` onto ``matched_xyxy``: what ``forward`` learns."""
        return self.coder.encode_single(matched_xyxy.float(), boxes_xyxy.float())

    def refine(self, features: torch.Tensor, boxes_xyxy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(N, D) raw features of (N, 4) xyxy boxes -> (N, 4) moved boxes, clipped to ``image_size``
        (h, w). Boxes may be in any pixel scale (deltas are relative); the result is in the same one."""
        deltas = self(features.to(self.bbox_pred.weight.dtype)).float()
        moved = self.coder.decode_single(deltas, boxes_xyxy.float())
        return clip_boxes_to_image(moved, image_size)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], embed_dim: int, where: str = "checkpoint") -> BoxRefiner:
        """A head from ``{"bbox_pred.weight": (4, D), "bbox_pred.bias": (4,)}``; one-line error when
        the shapes are not a class-agnostic head for ``embed_dim``-dimensional features."""
        weight, bias = state.get("bbox_pred.weight"), state.get("bbox_pred.bias")
        if weight is None or bias is None:
            raise WeightsUnavailable(f"{where}: the box head lacks bbox_pred.weight or bbox_pred.bias")
        hidden_w = state.get("mlp.0.weight")
        hidden = int(hidden_w.shape[0]) if hidden_w is not None else 0
        first = tuple(hidden_w.shape) if hidden_w is not None else tuple(weight.shape)
        if first[1:] != (embed_dim,) or tuple(weight.shape) != (4, hidden or embed_dim) or tuple(bias.shape) != (4,):
            raise WeightsUnavailable(
                f"{where}: the box head reads {first[1:]}-dimensional features but this CLIP's are "
                f"({embed_dim},): the checkpoint belongs to another model"
            )
        head = cls(embed_dim, hidden)
        head.load_state_dict({k: v.float() for k, v in state.items()})
        return head.eval()
