"""The finetune stage's loss: region embeddings of GT boxes and sampled proposals against the
text embeddings of the vocabulary, plus the class-agnostic proposal losses and the CLIP box head.

Every other category is a region's negative; background is a zero embedding, i.e. a constant
logit 0, exactly what ``ScoringConfig.background`` scores against at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import ImageBatch
from ..detector import RegionCLIP
from .config import TrainConfig
from .losses import box_regression_loss, mean_count
from .retention import OldNamesDistill
from .sampling import sample_regions
from .stages import RegionConceptLoss


class RegionTextLoss(nn.Module):
    """The trainable graph in one module, so DDP can wrap it: returns a dict of scalar losses.

    ``vocab`` names the targets' labels (``len(vocab)`` meaning background); ``text_emb`` its
    fixed embeddings when the text tower does not train (None: embedded every step, with
    gradients). ``captions`` (``loss.caption_regions``): a teacher labels proposals from the
    images' captions; those regions join the batch's, their concepts appended to the vocabulary
    (the base names first, as the targets count them). ``retain`` (``retention.distill_weight``):
    called with the step's regions, it returns the loss that keeps the starting model's names."""

    def __init__(self, model: RegionCLIP, cfg: TrainConfig, world: int, vocab: list[str],
                 text_emb: torch.Tensor | None = None, captions: RegionConceptLoss | None = None,
                 retain: OldNamesDistill | None = None):
        super().__init__()
        self.model = model
        self.retain = retain
        self.cfg = cfg
        self.world = world
        self.vocab = vocab
        self.text_emb = text_emb
        self.captions = captions
        if captions is not None:
            self.vocab = vocab + [c for c in captions.pool.names if c not in vocab]
            index = {name: k for k, name in enumerate(self.vocab)}
            self.concept_labels = torch.tensor([index[c] for c in captions.pool.names])

    def forward(self, batch: ImageBatch, targets) -> tuple[dict[str, torch.Tensor], int]:
        """One step's losses over ``batch`` (training targets in its pixels). Returns the losses
        and the number of regions this process trained on."""
        m = self.model
        proposals, losses, picked = self.proposals(batch, targets)
        boxes, labels, matched, regress = self.regions(proposals, targets, picked)
        text_emb = self.text_emb if self.text_emb is not None else m.text.embed(self.vocab)
        raw = m.embed(batch, boxes, raw=True)
        regions, scale = F.normalize(raw, dim=-1), m.clip.logit_scale.exp().clamp(max=100)
        logits = m.logits(regions, text_emb, background=True, scale=scale)
        # Divide by the global region count so DDP's gradient averaging gives the global mean.
        norm = mean_count(len(labels), self.world, batch.device)
        losses["loss_region_text"] = F.cross_entropy(logits, labels, reduction="sum") / norm
        if self.retain is not None:
            losses["loss_retain"] = self.retain(m, batch, boxes, regions, scale)
        if m.box_head is not None and self.cfg.loss.box_regression_weight > 0:
            losses["loss_box_reg"] = self.box_loss(raw, boxes, labels, matched, regress) / norm
        return losses, len(labels)

    def proposals(self, batch: ImageBatch, targets):
        """This step's proposals (per image ``(boxes, objectness probabilities)``), the proposal
        stage's losses when it trains, and the teacher's caption regions ``(boxes, concepts)``
        per image (None without captions), picked once from these proposals."""
        m, run, lc = self.model, self.cfg.train, self.cfg.loss
        plain = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        picked = None

        def caption_boxes(proposals):
            nonlocal picked
            picked = self.captions.caption_regions(batch, proposals, targets)
            return (picked[0] if lc.proposal_ignore_captions else None,
                    picked[0] if lc.proposal_caption_positives else None)

        losses = {}
        if run.train_proposals:
            # One backbone + RPN pass serves both the proposal losses and the region sampling.
            shaped = self.captions is not None and (lc.proposal_ignore_captions or lc.proposal_caption_positives)
            proposals, det_losses = m.proposals.forward_train(
                batch.images(), plain, lc.proposal_objectness, caption_boxes if shaped else None)
            losses = {k: v * lc.proposal_loss_weight for k, v in det_losses.items()}
        elif lc.positive_samples or lc.background_samples or lc.background_far_samples:
            with torch.no_grad():
                # Probabilities whatever the scoring recipe fuses: sampling thresholds and
                # rankings read objectness as one (a raw RPN logit is negative below 0.5).
                proposals = list(zip(*m.propose(batch, logits=False)))
        else:
            proposals = [(t["boxes"].new_zeros((0, 4)), t["boxes"].new_zeros((0,))) for t in targets]
        if self.captions is not None and picked is None:
            caption_boxes(proposals)
        return proposals, losses, picked

    def regions(self, proposals, targets, picked):
        """The regions this step trains on: ``sample_regions``' GT boxes, positives and
        background, plus the caption regions with their concepts' labels. Returns per-image
        boxes, the (sum N,) labels, per-image matched boxes (regression targets) and per-image
        flags of which regions have a box target (caption regions have none)."""
        lc = self.cfg.loss
        ignore = picked[0] if picked is not None and lc.proposal_ignore_captions else None
        boxes, labels, matched = sample_regions(proposals, targets, lc, background=len(self.vocab), ignore=ignore)
        regress = [torch.ones(len(b), dtype=torch.bool, device=labels.device) for b in boxes]
        if picked is None:
            return boxes, labels, matched, regress
        extra, concepts = picked
        per_image = list(labels.split([len(b) for b in boxes]))
        for i, (e, c) in enumerate(zip(extra, concepts)):
            boxes[i] = torch.cat([boxes[i], e])
            per_image[i] = torch.cat([per_image[i], self.concept_labels.to(c.device)[c]])
            matched[i] = torch.cat([matched[i], e])
            regress[i] = torch.cat([regress[i], torch.zeros(len(e), dtype=torch.bool, device=e.device)])
        return boxes, torch.cat(per_image), matched, regress

    def box_loss(self, raw: torch.Tensor, boxes, labels: torch.Tensor, matched, regress) -> torch.Tensor:
        """Fast R-CNN's box loss on the CLIP box head: the foreground regions' deltas to their
        matched GT box, summed (the caller divides by all sampled regions, torchvision's
        normalisation). Foreground rows are weighted in, not indexed out: no host sync."""
        head = self.model.box_head
        fg = (labels != len(self.vocab)) & torch.cat(regress)
        # Zero targets off the foreground: a degenerate region's NaN target would survive a 0 weight.
        targets = torch.where(fg[:, None], head.targets(torch.cat(boxes), torch.cat(matched)), 0.0)
        per_region = box_regression_loss(head(raw).float(), targets)
        return self.cfg.loss.box_regression_weight * (per_region * fg).sum()
