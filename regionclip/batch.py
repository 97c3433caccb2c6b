"""``ImageBatch``: images of any sizes in one padded tensor, with what it takes to undo it.

Every stage of ``RegionCLIP`` (propose, embed, logits, postprocess) takes one of these, so
``detect``, ``eval``, ``bench`` and training batch images the same way. Boxes inside the stages
are in *batch pixels* (the decoded, possibly reduced image); ``to_original`` and ``to_batch``
convert at the public boundary, where coordinates are original-image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .io import LoadedImage


@dataclass
class ImageBatch:
    """B images, each at the top-left of ``tensor`` and zero-padded to a common size.

    Attributes:
        tensor: (B, 3, H, W) float in [0, 1], RGB; H, W are multiples of ``size_divisible``.
        sizes: (h, w) of each image inside ``tensor`` (decoded pixels).
        original_sizes: (h, w) of each original image; differs from ``sizes`` when decoding
            reduced a large image.
    """

    tensor: torch.Tensor
    sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @classmethod
    def from_tensors(
        cls,
        images: Sequence[torch.Tensor],
        original_sizes: Sequence[tuple[int, int]] | None = None,
        size_divisible: int = 32,
    ) -> ImageBatch:
        """Pad 3xHxW float tensors in [0, 1] (one device) into a batch."""
        if not len(images):
            raise ValueError("an ImageBatch needs at least one image")
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in images]
        original = list(original_sizes) if original_sizes is not None else list(sizes)
        return cls(pad_stack(images, size_divisible), sizes, original)

    @classmethod
    def from_loaded(cls, loaded: Sequence[LoadedImage], device: torch.device | str = "cpu",
                    size_divisible: int = 32) -> ImageBatch:
        """Decoded images -> batch on ``device``; uint8 pixels travel, floats are made there."""
        # A read-only array (np.asarray of a PIL image) is copied: torch warns on wrapping one.
        tensors = [torch.from_numpy(x.pixels if x.pixels.flags.writeable else x.pixels.copy())
                   .to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0) for x in loaded]
        return cls.from_tensors(tensors, [x.original_size for x in loaded], size_divisible)

    def images(self) -> list[torch.Tensor]:
        """Unpadded 3xhxw views of each image (no copy)."""
        return [self.tensor[i, :, :h, :w] for i, (h, w) in enumerate(self.sizes)]

    def _scale(self, i: int) -> tuple[float, float]:
        (h, w), (oh, ow) = self.sizes[i], self.original_sizes[i]
        return ow / w, oh / h

    def to_original(self, i: int, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """(N, 4) xyxy in batch pixels of image ``i`` -> original-image pixels."""
        sx, sy = self._scale(i)
        if sx == 1.0 and sy == 1.0:
            return boxes_xyxy
        return boxes_xyxy * boxes_xyxy.new_tensor([sx, sy, sx, sy])

    def to_batch(self, i: int, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """(N, 4) xyxy in original-image pixels of image ``i`` -> batch pixels."""
        sx, sy = self._scale(i)
        if sx == 1.0 and sy == 1.0:
            return boxes_xyxy
        return boxes_xyxy / boxes_xyxy.new_tensor([sx, sy, sx, sy])


def aspect_groups(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices into ``sizes`` in batches of at most ``batch_size``: portrait and landscape
    images never share a batch (torchvision's detection references group the same way), and
    within each, similar aspect ratios go together (sorted by w/h), so padding stays small.
    Every index appears once."""
    step = max(1, int(batch_size))
    batches = []
    for landscape in (False, True):
        part = [i for i, (h, w) in enumerate(sizes) if (w >= h) == landscape]
        part.sort(key=lambda i: (sizes[i][1] / max(1, sizes[i][0]), i))
        batches += [part[s:s + step] for s in range(0, len(part), step)]
    return batches


def pad_stack(images: Sequence[torch.Tensor], size_divisible: int) -> torch.Tensor:
    """Stack (3, h, w) tensors into (B, 3, H, W), zero-padded at the bottom and right."""
    d = max(1, size_divisible)
    h = -(-max(t.shape[-2] for t in images) // d) * d
    w = -(-max(t.shape[-1] for t in images) // d) * d
    return torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in images])
