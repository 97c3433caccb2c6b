"""The caption-driven stages before box fine-tuning (RegionCLIP's recipe).

``clip``: image-level CLIP training, whole images against one of their captions, symmetric
InfoNCE over the (global) batch, both towers and the temperature learning.

``region_pretrain``: a frozen teacher CLIP scores the student's RPN proposals, as crops, against
the concept pool; each proposal takes the concept its image's captions mention that the teacher
rates highest, when the teacher is sure enough (``losses.pseudo_labels``). The student learns
from those pseudo pairs with a region-concept cross-entropy over the pool, plus KL distillation
of the teacher's soft labels on every proposal (optionally plus the clip stage's image-caption
loss). The RPN keeps learning from whatever boxes the instances file has (the base ones), and
with ``pretrain.use_boxes`` those boxes also label the proposals on them and narrow what the
others may be (``RegionConceptLoss.box_evidence``).

Each loss module returns ``(losses, n)`` like ``loop.RegionTextLoss``, so one loop runs them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.ops import box_iou, nms

from ..concepts import ConceptPool, load_concepts
from ..data import load_captions
from ..data.captions import captions_path_for
from ..detector import RegionCLIP
from ..errors import BadConfig
from .config import TrainConfig
from .losses import clip_loss, distill_loss, mean_count, pseudo_labels


class Captioned(Dataset):
    """A ``CocoDetection`` whose targets also carry ``captions`` (list of str) and ``concepts``
    (pool indices the captions mention, a LongTensor)."""

    def __init__(self, dataset, captions: dict[int, list[str]], pool: ConceptPool):
        self.dataset = dataset
        self.captions = captions
        self.concepts = {i: torch.tensor(pool.image_concepts(c), dtype=torch.long) for i, c in captions.items()}
        self.pool = pool

    @property
    def category_names(self) -> list[str]:
        return self.dataset.category_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):  # an index, or (index, augmentation seed): see CocoDetection
        image, target = self.dataset[key]
        image_id = target["image_id"]
        return image, {**target, "captions": self.captions[image_id], "concepts": self.concepts[image_id]}


def captioned(dataset, cfg: TrainConfig, split: dict | None) -> Captioned:
    """Attach the captions file (``data.train_captions`` or the one beside the instances) and
    the concept pool (``data.concepts``; default the split's names, else the file's categories)."""
    path = cfg.data.train_captions or captions_path_for(cfg.data.train_annotations)
    captions = load_captions(path, image_ids=dataset.ids)
    spec = cfg.data.concepts
    if spec is None:
        spec = split["base"] + split["novel"] if split else [c["name"] for c in dataset.coco.dataset["categories"]]
    return Captioned(dataset, captions, load_concepts(spec))


def _caption_embeddings(model: RegionCLIP, targets) -> torch.Tensor:
    """(B, D) unit embeddings of one caption per image, drawn from torch's RNG (resumable)."""
    picks = [t["captions"][int(torch.randint(len(t["captions"]), ()))] for t in targets]
    tokens = model.text.tokenizer(picks).to(model.device)
    return F.normalize(model.clip.encode_text(tokens), dim=-1)


def image_text_loss(model: RegionCLIP, batch, targets, cfg: TrainConfig, world: int) -> torch.Tensor:
    """The clip stage's loss on ``batch``: whole images against one caption each."""
    image = F.normalize(model.regions.whole_images(batch.images(), cfg.clip.image_size), dim=-1)
    text = _caption_embeddings(model, targets)
    world = world if cfg.clip.gather else 1
    scale = model.clip.logit_scale.exp().clamp(max=100)
    return clip_loss(image, text, scale, world)


class ImageTextLoss(nn.Module):
    def __init__(self, model: RegionCLIP, cfg: TrainConfig, world: int):
        super().__init__()
        self.model, self.cfg, self.world = model, cfg, world

    def forward(self, batch, targets) -> tuple[dict[str, torch.Tensor], int]:
        return {"loss_image_text": image_text_loss(self.model, batch, targets, self.cfg, self.world)}, len(targets)


class Teacher:
    """A frozen CLIP that scores boxes as crops against the concept pool (not a submodule of
    the loss, so DDP and the optimizer never see its weights)."""

    def __init__(self, spec: str, pool: ConceptPool, device: torch.device):
        try:
            self.model = RegionCLIP.from_pretrained(spec, ["mode=crop"], device=str(device))
        except BadConfig as exc:
            raise BadConfig(f"pretrain.teacher {spec}: {exc}") from None
        self.model.eval().requires_grad_(False)
        with torch.no_grad():
            self.text = self.model.text.embed(pool.names).float()

    @torch.no_grad()
    def logits(self, batch, boxes: list[torch.Tensor]) -> torch.Tensor:
        m = self.model
        return m.logits(m.embed(batch, boxes), self.text, background=False).float()


class RegionConceptLoss(nn.Module):
    def __init__(self, model: RegionCLIP, teacher: Teacher, pool: ConceptPool, cfg: TrainConfig, world: int,
                 vocab: list[str]):
        super().__init__()
        self.model, self.cfg, self.world, self.pool = model, cfg, world, pool
        self.teacher = teacher
        self.text_emb: torch.Tensor | None = None
        # Box label index -> concept index (-1 for a category the pool lacks).
        index = {name: k for k, name in enumerate(pool.names)}
        self.label_concepts = torch.tensor([index.get(name, -1) for name in vocab], dtype=torch.long)

    def select(self, boxes: torch.Tensor, objectness: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Indices of the proposals the teacher scores: the ``proposals_per_image`` most confident.
        With ``use_boxes``, half of them from those far from every labelled box, after NMS at 0.5
        there: otherwise the labelled objects' many overlapping boxes fill the quota and an
        unlabelled object makes it in rarely (12 of 33 novel shapes on shapes train)."""
        pc, n = self.cfg.pretrain, self.cfg.pretrain.proposals_per_image
        order = objectness.argsort(descending=True)
        if not pc.use_boxes or not len(boxes):
            return order[:n]
        far = self.far_iou()
        iou = box_iou(boxes, labelled.float()).amax(dim=1) if len(labelled) else boxes.new_zeros(len(boxes))
        is_far = iou < far
        far_idx = torch.nonzero(is_far).flatten()
        far_idx = far_idx[nms(boxes[far_idx], objectness[far_idx], 0.5)]  # nms returns by score
        near_idx = order[~is_far[order]]
        n_far = min(len(far_idx), max(n // 2, n - len(near_idx)))
        return torch.cat([near_idx[:n - n_far], far_idx[:n_far]])

    def far_iou(self) -> float:
        return self.cfg.loss.background_iou_min or 0.3

    def box_evidence(self, boxes, scores, targets) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``pretrain.use_boxes``: (N,) concepts of proposals on a labelled box (-1 elsewhere),
        (N,) which proposals may take a caption concept, and per image the concepts they may take
        (mentioned, and never a labelled category's)."""
        lc, pc = self.cfg.loss, self.cfg.pretrain
        far = self.far_iou()
        fixed, eligible, candidates = [], [], []
        for b, objectness, t in zip(boxes, scores, targets):
            if len(t["boxes"]) and len(b):
                iou, match = box_iou(b, t["boxes"].float()).max(dim=1)
                label = t["labels"][match]  # a hard negative (-1) has no concept
                concept = torch.where(label >= 0, self.label_concepts.to(b.device)[label.clamp(min=0)], -1)
                fixed.append(torch.where(iou >= lc.positive_iou, concept, -1))
            else:
                iou = b.new_zeros(len(b))
                fixed.append(torch.full((len(b),), -1, dtype=torch.long, device=b.device))
            eligible.append((iou < far) & (objectness >= pc.min_objectness))
            mentioned = t["concepts"].to(b.device)
            candidates.append(mentioned[~torch.isin(mentioned, self.label_concepts.to(b.device))])
        return torch.cat(fixed), torch.cat(eligible), candidates

    def concept_embeddings(self) -> torch.Tensor:
        m = self.model
        if self.cfg.train.train_text_tower:
            return m.text.embed(self.pool.names)
        if self.text_emb is None:  # a frozen text tower: embedded once
            with torch.no_grad():
                self.text_emb = m.text.embed(self.pool.names).float()
        return self.text_emb

    def pseudo(self, batch, proposals, targets) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's pass over ``proposals`` (per image ``(boxes, objectness)``): the selected
        boxes per image, the teacher's (N, C) logits over the pool, (N,) concept labels (-1: none)
        and (N,) whether a label came from a labelled box rather than from captions."""
        pc = self.cfg.pretrain
        boxes, scores = [], []
        for (p, objectness), t in zip(proposals, targets):
            p, objectness = p.detach().float(), objectness.detach().float()
            big = (p[:, 2] - p[:, 0] >= 4) & (p[:, 3] - p[:, 1] >= 4)
            keep = self.select(p[big], objectness[big], t["boxes"])
            boxes.append(p[big][keep])
            scores.append(objectness[big][keep])
        counts = [len(b) for b in boxes]
        teacher = self.teacher.logits(batch, boxes)
        probs = teacher.softmax(dim=1)
        if pc.use_boxes:
            fixed, eligible, candidates = self.box_evidence(boxes, scores, targets)
            # Among far proposals, a whole object outranks the pieces of it that look as much
            # like the concept (measured on shapes: ranked by the teacher alone, 34 of 43 caption
            # labels fell on pieces or clutter).
            rank = probs * torch.cat(scores)[:, None]
        else:
            fixed, eligible, candidates, rank = None, None, [t["concepts"] for t in targets], None
        labels = pseudo_labels(probs, counts, candidates, pc.threshold, pc.top_k, eligible, rank)
        boxed = torch.zeros_like(labels, dtype=torch.bool)
        if fixed is not None:
            boxed = fixed >= 0
            labels = torch.where(boxed, fixed, labels)
        return boxes, teacher, labels, boxed

    def caption_regions(self, batch, proposals, targets) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, the proposals labelled from captions (not from boxes) and their concepts:
        what box fine-tuning adds with ``loss.caption_regions``."""
        boxes, _, labels, boxed = self.pseudo(batch, proposals, targets)
        out_boxes, out_labels = [], []
        for b, lab, bx in zip(boxes, labels.split([len(b) for b in boxes]), boxed.split([len(b) for b in boxes])):
            pick = (lab >= 0) & ~bx
            out_boxes.append(b[pick])
            out_labels.append(lab[pick])
        return out_boxes, out_labels

    def forward(self, batch, targets) -> tuple[dict[str, torch.Tensor], int]:
        m, pc, run = self.model, self.cfg.pretrain, self.cfg.train
        losses = {}
        boxes_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        if run.train_proposals:
            proposals, det_losses = m.proposals.forward_train(batch.images(), boxes_targets,
                                                              self.cfg.loss.proposal_objectness)
            losses = {k: v * self.cfg.loss.proposal_loss_weight for k, v in det_losses.items()}
        else:
            with torch.no_grad():
                # Probabilities whatever the scoring recipe fuses: sampling thresholds and
                # rankings read objectness as one (a raw RPN logit is negative below 0.5).
                proposals = list(zip(*m.propose(batch, logits=False)))
        boxes, teacher, labels, _ = self.pseudo(batch, proposals, targets)
        scale = m.clip.logit_scale.exp().clamp(max=100)
        student = m.logits(m.embed(batch, boxes), self.concept_embeddings(), background=False, scale=scale)
        keep = labels >= 0
        n = keep.sum()  # a tensor: no host sync inside the step
        device = batch.device
        norm = mean_count(n, self.world, device)
        # Every term is built even when empty, so each rank's graph reaches the same parameters.
        # Unlabelled proposals (-1) are weighted out rather than indexed out (which would sync).
        losses["loss_region_concept"] = pc.contrastive_weight * (F.cross_entropy(
            student, labels.clamp(min=0), reduction="none") * keep).sum() / norm
        losses["loss_distill"] = pc.distill_weight * distill_loss(student, teacher).sum() / mean_count(
            len(student), self.world, device)
        if pc.image_text_weight:
            losses["loss_image_text"] = pc.image_text_weight * image_text_loss(m, batch, targets, self.cfg, self.world)
        return losses, n
