"""Concept embeddings, RegionCLIP's text ensemble, its region scoring and its box predictor.

Concept files (``coco_65_cls_emb.pth``, ``lvis_1203_cls_emb.pth``, ``*_rn50x4.pth``) are bare
``(N, D)`` tensors written by ``tools/extract_concept_features.py``: for each name, the CLIP text
features of 81 prompts (``REGIONCLIP_TEMPLATES``) averaged WITHOUT normalising each prompt first,
then ``torch.squeeze``d (so a one-name file is ``(D,)``). RegionCLIP normalises rows when it scores.

Scoring (``FastRCNNOutputLayers.forward`` / ``inference`` in ``roi_heads/fast_rcnn.py``):
``[cos(x, w_k) for k] + [normalize(x) . w_bg]``, divided by ``MODEL.CLIP.CLSS_TEMP`` (0.01),
softmax over the N + 1 columns; background (last column) dropped; with
``MODEL.CLIP.MULTIPLY_RPN_SCORE`` (zero-shot) ``sqrt(p * rpn_objectness_logit)``, where the RPN
value is the raw logit, not its sigmoid.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder

from ..box_head import BOX_CODER_WEIGHTS
from ..errors import BadInput, WeightsUnavailable
from ..text import TextEncoder, check_labels
from .files import KINDS, detect_kind, read_file

TEMPERATURE = 0.01  # MODEL.CLIP.CLSS_TEMP
BOX_REG_WEIGHTS = BOX_CODER_WEIGHTS  # MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS (10, 10, 5, 5)
# detectron2/data/datasets/clip_prompt_utils.py get_prompt_templates(), in order.
REGIONCLIP_TEMPLATES = (
    "{}.", "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)


def load_concept_embeddings(source: str | os.PathLike | torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """A concept-embedding file (or tensor) -> (N, D) float32 rows, unit-norm with ``normalize``.

    RegionCLIP stores un-normalised means and normalises them whenever it scores, so unit rows
    lose nothing. A ``(D,)`` tensor is one concept (RegionCLIP squeezes one-name files).
    """
    where = "text embeddings" if isinstance(source, torch.Tensor) else str(source)
    obj = source if isinstance(source, torch.Tensor) else read_file(source)
    if not isinstance(obj, torch.Tensor):
        kind = detect_kind(obj)
        raise WeightsUnavailable(
            f"{where}: this is {KINDS[kind]}, expected a concept-embedding tensor (N, D) such as "
            "coco_65_cls_emb.pth"
        )
    if obj.ndim == 1:
        obj = obj[None]
    if obj.ndim != 2 or not obj.is_floating_point() or 0 in obj.shape:
        raise WeightsUnavailable(
            f"{where}: concept embeddings must be a float tensor of shape (N, D), but got "
            f"{obj.dtype} {tuple(obj.shape)}"
        )
    emb = obj.float()
    norms = emb.norm(dim=1)
    bad = torch.nonzero(~torch.isfinite(norms) | (norms == 0)).flatten()
    if len(bad):
        raise WeightsUnavailable(f"{where}: row {int(bad[0])} of the concept embeddings is zero or not finite")
    return F.normalize(emb, dim=1) if normalize else emb


def check_concept_embeddings(emb: torch.Tensor, labels: Sequence[str], embed_dim: int | None,
                             where: str = "text embeddings") -> torch.Tensor:
    """Raise ``BadInput`` (one line) unless ``emb`` has one row per label and ``embed_dim`` columns
    (``None``: any; the count can be checked before a model is built)."""
    if len(emb) != len(labels):
        raise BadInput(
            f"{where} hold {len(emb)} embeddings but {len(labels)} labels were given: the labels file "
            "must list the names of the embedding file, one per line, in its order"
        )
    if embed_dim is not None and emb.shape[1] != embed_dim:
        raise BadInput(
            f"{where} have dimension {emb.shape[1]} but the CLIP model embeds to {embed_dim} "
            "(RN50: 1024, the plain *_cls_emb.pth files; RN50x4: 640, the *_rn50x4.pth files)"
        )
    return emb


def concept_vocabulary(source: str | os.PathLike | torch.Tensor, labels: Sequence[str],
                       embed_dim: int | None = None) -> torch.Tensor:
    """``load_concept_embeddings`` + ``check_concept_embeddings``: (L, D) unit rows for ``labels``."""
    where = "text embeddings" if isinstance(source, torch.Tensor) else f"text embeddings {source}"
    return check_concept_embeddings(load_concept_embeddings(source), labels, embed_dim, where)


def regionclip_prompts(label: str, templates: Sequence[str] = REGIONCLIP_TEMPLATES) -> list[str]:
    """RegionCLIP's prompts for one name (``prompt_engineering``: drops ',' and reads '+' as ' ')."""
    name = label.replace(",", "").replace("+", " ")
    return [t.replace("{}", name) for t in templates]


def regionclip_text_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor],
                               tokenizer: Callable[[list[str]], torch.Tensor],
                               labels: Sequence[str], templates: Sequence[str] = REGIONCLIP_TEMPLATES
                               ) -> torch.Tensor:
    """(L, D) concept embeddings computed as ``extract_concept_features.py`` does (raw template mean).

    ``encode_text`` maps token ids to un-normalised text features (``clip.encode_text``).
    Normalise the rows (``load_concept_embeddings``) before scoring.
    """
    feats = []
    for label in labels:
        tokens = tokenizer(regionclip_prompts(label, templates))
        feats.append(encode_text(tokens).float().mean(dim=0))
    return torch.stack(feats)


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


def regionclip_probabilities(region_features: torch.Tensor, concept_emb: torch.Tensor,
                             bg_weight: torch.Tensor | None = None, temperature: float = TEMPERATURE
                             ) -> torch.Tensor:
    """RegionCLIP's class probabilities: (R, D) attention-pool outputs, (N, D) concepts -> (R, N + 1).

    Column N is background: its logit is ``normalize(x) . bg_weight`` (the fine-tuned
    ``cls_bg_score.weight``, (1, D), not normalised), zero without one, as at zero-shot.
    """
    x = F.normalize(region_features.float(), dim=1)
    logits = x @ F.normalize(concept_emb.float(), dim=1).T
    bg = x @ bg_weight.float().T if bg_weight is not None else logits.new_zeros((len(x), 1))
    return (torch.cat([logits, bg], dim=1) / temperature).softmax(dim=1)


def regionclip_scores(probs: torch.Tensor, objectness_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(R, N + 1) probabilities -> (R, N) detection scores, background dropped.

    With RPN ``objectness_logits`` (R,) (zero-shot, ``MULTIPLY_RPN_SCORE``): ``sqrt(p * logit)``.
    RegionCLIP drops boxes whose product is negative (NaN scores fail its finiteness check); here
    they score 0, which no positive score threshold keeps either.
    """
    scores = probs[:, :-1].float()
    if objectness_logits is not None:
        scores = (scores * objectness_logits.float()[:, None]).clamp(min=0).sqrt()
    return scores


def box_predictor(state: dict, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The fine-tuned box predictor of a ``regionclip_finetuned-*`` state dict, as plain tensors.

    Keys (D = CLIP embed dim, 1024 for RN50, 640 for RN50x4; K = training classes, 48 for OV-COCO):
    ``cls_score.weight`` (K, D) base-class concept embeddings the detector was trained with;
    ``cls_bg_score.weight`` (1, D) background weight, applied to the normalised region feature;
    ``bbox_pred.weight`` (4, D) and ``bbox_pred.bias`` (4,) class-agnostic deltas (dx, dy, dw, dh)
    from the raw (un-normalised) attention-pool output, decoded with ``BOX_REG_WEIGHTS``;
    ``test_cls_score.weight`` (N, D) if the file has one.
    """
    prefix = "roi_heads.box_predictor."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    needed = ("cls_score.weight", "cls_bg_score.weight", "bbox_pred.weight", "bbox_pred.bias")
    missing = [prefix + k for k in needed if k not in out]
    if missing:
        raise WeightsUnavailable(f"{where}: the box predictor is missing {', '.join(missing)}")
    dim = out["cls_score.weight"].shape[1]
    if out["bbox_pred.weight"].shape != (4, dim) or out["cls_bg_score.weight"].shape != (1, dim):
        raise WeightsUnavailable(
            f"{where}: expected a class-agnostic box predictor (bbox_pred.weight (4, {dim}), "
            f"cls_bg_score.weight (1, {dim})), got {tuple(out['bbox_pred.weight'].shape)} and "
            f"{tuple(out['cls_bg_score.weight'].shape)}"
        )
    return {k: v.float() for k, v in out.items()}


def refine_boxes(predictor: dict[str, torch.Tensor], region_features: torch.Tensor,
                 boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Apply the fine-tuned class-agnostic box deltas: (R, D) raw attention-pool outputs and (R, 4)
    xyxy boxes (any pixel scale: deltas are relative) -> (R, 4) refined xyxy boxes, unclipped."""
    deltas = region_features.float() @ predictor["bbox_pred.weight"].T + predictor["bbox_pred.bias"]
    coder = BoxCoder(BOX_REG_WEIGHTS)  # detectron2's Box2BoxTransform: same decode, same log(1000/16) clamp
    return coder.decode_single(deltas, boxes_xyxy.float())
