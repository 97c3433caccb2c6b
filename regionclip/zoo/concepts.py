"""RegionCLIP's prompt templates and its fine-tuned box predictor, as the importer reads them.

Concept files (``coco_65_cls_emb.pth``, ``lvis_1203_cls_emb.pth``, ``*_rn50x4.pth``) are bare
``(N, D)`` tensors written by ``tools/extract_concept_features.py``: for each name, the CLIP text
features of 81 prompts (``REGIONCLIP_TEMPLATES``) averaged WITHOUT normalising each prompt first,
then ``torch.squeeze``d (so a one-name file is ``(D,)``). RegionCLIP normalises rows when it scores.
Reading them is the core's (``regionclip.vocabulary``), as are RegionCLIP's text ensemble
(``text.RegionCLIPTextEncoder``), its scoring (``scoring.region_logits`` at scale 1 / ``TEMPERATURE``
with the learned background, ``scoring.regionclip_scores``) and its box deltas (``box_head.BoxRefiner``):
the importer only converts files into what those read.
"""

from __future__ import annotations

import torch

from ..box_head import BOX_CODER_WEIGHTS
from ..errors import WeightsUnavailable
from ..text import RegionCLIPTextEncoder, regionclip_prompts  # noqa: F401 (re-exported)
from ..vocabulary import check_concept_embeddings, concept_vocabulary, load_concept_embeddings  # noqa: F401

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


