"""The losses of the three training stages, as plain functions of embeddings.

- ``clip_loss``: CLIP's symmetric InfoNCE (open_clip's ``ClipLoss``), on features gathered from
  every DDP rank.
- ``pseudo_labels``: RegionCLIP's region-concept pseudo labels from a teacher's scores.
- ``distill_loss``: KL from the teacher's soft labels over the concept pool to the student's.
- ``box_regression_loss``: Fast R-CNN's smooth L1 on class-agnostic box deltas.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float, world: int = 1) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (open_clip's ``ClipLoss``) over (B, D) unit image and text
    embeddings, pair i matching i: the mean of the image->text and text->image cross-entropies at
    temperature ``1 / scale``. With ``world`` > 1 both are gathered from every rank first, with
    gradients (``gather_with_grad``): each rank's loss is the global batch's, and DDP's averaging
    of the gradients each rank's part receives equals one process training on the global batch."""
    rank = dist.get_rank() if world > 1 else 0
    return ClipLoss(gather_with_grad=world > 1, rank=rank, world_size=world)(image, text, scale)


def pseudo_labels(probs: torch.Tensor, counts: Sequence[int], concepts: Sequence[torch.Tensor],
                  threshold: float, top_k: int, eligible: torch.Tensor | None = None,
                  rank: torch.Tensor | None = None) -> torch.Tensor:
    """RegionCLIP's pseudo labels: (N,) concept index per proposal, -1 where none.

    ``probs`` (N, C): the teacher's softmax over the whole concept pool for the proposals of a
    batch, ``counts[i]`` of them belonging to image i, whose candidate concepts are
    ``concepts[i]`` (pool indices: what its captions mention). A proposal takes the candidate the
    teacher rates highest when its share among the candidates reaches ``threshold``; each concept
    keeps the ``top_k`` proposals of the image the teacher rates highest for it (by the pool-wide
    probability, which says how much the crop looks like the concept at all, where the share
    among one or two candidates cannot), or by ``rank`` (N, C) when given. ``eligible`` (N,)
    bool limits which proposals may take one.
    """
    rank = probs if rank is None else rank
    labels = torch.full((len(probs),), -1, dtype=torch.long, device=probs.device)
    start = 0
    for n, mentioned in zip(counts, concepts):
        mentioned = torch.as_tensor(mentioned, dtype=torch.long, device=probs.device)
        if n and len(mentioned):
            p = probs[start:start + n, mentioned]
            share, best = (p / p.sum(dim=1, keepdim=True).clamp(min=1e-12)).max(dim=1)
            ok = share >= threshold
            if eligible is not None:
                ok &= eligible[start:start + n]
            for j in range(len(mentioned)):
                rows = torch.nonzero((best == j) & ok).flatten()
                rows = rows[rank[start + rows, mentioned[j]].argsort(descending=True)[:top_k]]
                labels[start + rows] = mentioned[j]
        start += n
    return labels


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(N,) KL(teacher || student) per region, both softmaxes over the same concept pool."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1),
                    reduction="none", log_target=True).sum(dim=1)


def box_regression_loss(deltas: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) smooth L1 summed over the 4 deltas, with torchvision's ``beta = 1 / 9``."""
    return F.smooth_l1_loss(deltas, targets, beta=1 / 9, reduction="none").sum(dim=1)


def mean_count(n: int | torch.Tensor, world: int, device: torch.device) -> float | torch.Tensor:
    """Mean of the count ``n`` over the processes, at least 1: losses divide by it so DDP's
    gradient averaging yields the global mean. A tensor on ``device`` when ``n`` is one or there
    are several processes: the count is summed there, and reading it back would stall the host
    every step."""
    if world == 1 and not isinstance(n, torch.Tensor):
        return max(1.0, float(n))
    t = (n.detach().to(device=device, dtype=torch.float32).clone() if isinstance(n, torch.Tensor)
         else torch.full((), float(n), device=device))  # a fill, not a blocking host copy
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t.clamp(min=1.0)
