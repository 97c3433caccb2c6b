"""What keeps the training step fed: one DataLoader for the whole run, batches as uint8.

- Workers decode (and resize, flip) a batch ahead; they persist across epochs, so a new epoch
  does not pay their start-up again.
- Images travel as uint8 (a quarter of float32's bytes), pinned when the model is on CUDA, and
  become [0, 1] floats on the device (``data.to_float``).
- A sample's augmentation is drawn from a seed of (seed, epoch, rank, index), not from a worker's
  RNG: the same run gives the same flips with 0 or 4 workers and after a resume, and the ranks
  of a DDP run draw independently.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..data import collate, to_float


def sample_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    """The augmentation seed of one sample of one epoch on one rank (a 63-bit mix)."""
    return (((seed * 1_000_003 + epoch) * 1_009 + rank) * 1_000_033 + index) % (1 << 63)


class EpochBatches(Sampler):
    """The batch sampler: per-rank batches of ``(index, augmentation seed)`` keys for the epoch
    ``start`` picked, skipping its first ``skip`` batches (resume mid-epoch). Global batch k
    holds the same images whatever the world size (``DistributedSampler``'s order); an epoch's
    last partial batch is dropped."""

    def __init__(self, sampler: DistributedSampler, per_rank: int, seed: int, rank: int) -> None:
        self.sampler, self.per_rank, self.seed, self.rank = sampler, per_rank, seed, rank
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, len(self.sampler) // self.per_rank - self.skip)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self.sampler.set_epoch(self.epoch)
        indices = list(self.sampler)
        indices = indices[self.skip * self.per_rank: len(indices) // self.per_rank * self.per_rank]
        for k in range(0, len(indices), self.per_rank):
            yield [(i, sample_seed(self.seed, self.epoch, self.rank, i)) for i in indices[k:k + self.per_rank]]


class Feed:
    """Batches on ``device``, epoch after epoch: ``next()`` gives ``(images, targets, dropped)``
    with float images in [0, 1], targets' boxes and labels on the device, and the number of
    boxes the transforms dropped. ``epoch`` and ``position`` (batches done in it) are what a
    checkpoint stores to resume from."""

    def __init__(self, dataset, sampler: DistributedSampler, per_rank: int, seed: int, rank: int,
                 num_workers: int, device: torch.device, epoch: int = 0, position: int = 0) -> None:
        self.batches = EpochBatches(sampler, per_rank, seed, rank)
        self.per_epoch = len(sampler) // per_rank
        self.device = device
        self.epoch, self.position = epoch, position
        # The generator only seeds the workers' base RNG (augmentation does not read it); a fixed
        # one keeps DataLoader from drawing that seed from the global RNG, which resumes exactly.
        self.loader = DataLoader(dataset, batch_sampler=self.batches, collate_fn=collate,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
        self._it = self._start()

    def _start(self):
        self.batches.start(self.epoch, self.position)
        return iter(self.loader)

    def next(self) -> tuple[list[torch.Tensor], list[dict], int]:
        if self.position >= self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._it = self._start()
        images, targets = next(self._it)
        self.position += 1
        dropped = sum(t.get("dropped", 0) for t in targets)
        targets = [{**t, "boxes": t["boxes"].to(self.device, non_blocking=True),
                    "labels": t["labels"].to(self.device, non_blocking=True)} for t in targets]
        return to_float(images, self.device), targets, dropped
