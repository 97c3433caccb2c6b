"""``import_regionclip``: RegionCLIP's released files -> one regionclip checkpoint + preset YAML.

The checkpoint is the format ``RegionCLIP.save`` writes (``format``, ``config``,
``clip_model_config``, ``clip``, ``detector``) plus ``detector_layout`` (``fpn``/``c4``: build the
detector with ``zoo.build_rpn_detector``), ``box_predictor`` (fine-tuned files: ``RegionCLIP``
loads ``bbox_pred.*`` as its box head and ``cls_bg_score.weight`` as its background) and ``source``.
The preset's numbers are RegionCLIP's test-time settings (``RECIPES``: ``scoring.recipe:
regionclip``, ``text.ensemble: regionclip``, ``regions.box_refinement`` for fine-tuned files), so
``--model PRESET.yaml`` runs their configuration.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import yaml

from ..atomic import atomic_torch_save, atomic_write_text
from ..config import ModelConfig, ScoringConfig, from_dict, to_dict
from ..errors import WeightsUnavailable
from ..weights import register_clip_config
from .clip_tower import build_clip, clip_model_name, convert_clip
from .concepts import REGIONCLIP_TEMPLATES, box_predictor
from .files import detect_kind, expect, read_file
from .rpn import DETECTORS, RPN_DEFAULTS, build_rpn_detector, convert_rpn

CHECKPOINT_FORMAT = "regionclip/1"  # must equal regionclip.detector.CHECKPOINT_FORMAT (tested)

# RegionCLIP's test-time settings (configs/*/CLIP_fast_rcnn_R_50_C4*.yaml, test_*.sh).
RECIPES = {
    # regionclip_pretrained-cc + rpn_lvis_866 (test_zeroshot_inference.sh, "RPN, COCO"):
    # OFFLINE_RPN_NMS_THRESH 0.9, NO_BOX_DELTA, MULTIPLY_RPN_SCORE, SCORE_THRESH_TEST 0.001, NMS 0.5.
    "zero-shot": dict(rpn_nms=0.9, background=True, objectness_weight=0.5, score_threshold=0.001,
                      nms_iou=0.5, soft_nms=False, box_refinement=False, max_detections=100),
    # regionclip_finetuned-coco + rpn_coco_48 (test_transfer_learning.sh): box deltas on,
    # no RPN score, SCORE_THRESH_TEST 0.001, soft-NMS (gaussian, sigma 0.5) at test.
    "finetuned-coco": dict(rpn_nms=0.7, background=True, objectness_weight=0.0, score_threshold=0.001,
                           nms_iou=0.5, soft_nms=True, box_refinement=True, max_detections=100),
    # regionclip_finetuned-lvis (CLIP_fast_rcnn_R_50_C4.yaml): MULTIPLY_RPN_SCORE, 0.02, 300 per image,
    # soft-NMS. Their LVIS runs use rpn_lvis_866_lsj (SyncBN), which this importer does not read.
    "finetuned-lvis": dict(rpn_nms=0.7, background=True, objectness_weight=0.5, score_threshold=0.02,
                           nms_iou=0.5, soft_nms=True, box_refinement=True, max_detections=300),
}


@dataclass(frozen=True)
class Imported:
    checkpoint: Path
    preset: Path
    recipe: str  # a RECIPES key
    clip_model: str  # open_clip name, e.g. RN50-quickgelu
    detector: str  # a zoo.DETECTORS name, e.g. detectron2_r50_fpn


def _recipe(kind: str, predictor: dict | None) -> str:
    if kind == "regionclip-pretrained":
        return "zero-shot"
    return "finetuned-lvis" if predictor["cls_score.weight"].shape[0] > 100 else "finetuned-coco"


def preset_config(name: str, clip_model: str, detector: str, checkpoint: Path, recipe: str) -> ModelConfig:
    """The ``ModelConfig`` of an imported model (validated against the current config fields)."""
    r = RECIPES[recipe]
    layout = DETECTORS[detector]
    rpn = RPN_DEFAULTS[layout]
    scoring = dict(recipe="regionclip", logit_scale=100.0, background=r["background"],
                   objectness_weight=r["objectness_weight"], score_threshold=r["score_threshold"],
                   nms_iou=r["nms_iou"], soft_nms=r["soft_nms"], max_detections=r["max_detections"])
    if "agnostic_nms" in {f.name for f in dataclasses.fields(ScoringConfig)}:
        scoring["agnostic_nms"] = False  # RegionCLIP runs per-class NMS only
    extra = {}
    if "input_max_side" in {f.name for f in dataclasses.fields(ModelConfig)}:
        extra["input_max_side"] = 0  # decode at full size, as detectron2 does, then resize
    data = dict(
        name=name, clip_model=clip_model, clip_pretrained="none", detector=detector, detector_weights="none",
        checkpoint=str(checkpoint), mode="pool", **extra,
        proposals=dict(source="rpn", num_proposals=rpn["num_proposals"], pre_nms_top_n=rpn["pre_nms_top_n"],
                       nms_threshold=r["rpn_nms"], min_size=rpn["min_size"], max_size=rpn["max_size"]),
        regions=dict(pool_short_side=800, pool_max_side=1333, pool_variant="regionclip",
                     box_refinement=r["box_refinement"]),
        text=dict(templates=list(REGIONCLIP_TEMPLATES), ensemble="regionclip"),
        scoring=scoring,
    )
    return from_dict(ModelConfig, data, where=f"preset {name}")


def _save_atomic(obj, path: Path) -> None:
    if isinstance(obj, str):
        atomic_write_text(path, obj)
    else:
        atomic_torch_save(obj, path)


def import_regionclip(weights: str | os.PathLike, rpn: str | os.PathLike, out_dir: str | os.PathLike, *,
                      text_from: str | os.PathLike | None = None, name: str | None = None,
                      half: bool = False) -> Imported:
    """Convert RegionCLIP files into ``out_dir/NAME.pt`` + ``out_dir/NAME.yaml`` (for ``--model``).

    ``weights``: ``regionclip_pretrained-cc_{rn50,rn50x4}.pth`` (zero-shot) or
    ``regionclip_finetuned-{coco,lvis}_*.pth``. ``rpn``: ``rpn_lvis_866.pth`` (R50-FPN, zero-shot) or
    ``rpn_coco_48.pth`` (R50-C4, OV-COCO); passing ``weights`` again uses the RPN copy a RegionCLIP
    file carries under ``offline_*``. ``text_from``: the pretrained file, for fine-tuned weights,
    which hold no text tower. ``half`` stores fp16. Every part is loaded into its model before
    anything is written; a wrong file raises ``WeightsUnavailable`` naming it.
    """
    state = read_file(weights)
    kind = expect(state, weights, "regionclip-pretrained", "regionclip-finetuned")
    text_state = None
    if text_from is not None:
        text_state = read_file(text_from)
        expect(text_state, text_from, "regionclip-pretrained", "open_clip")
    clip_state, clip_config = convert_clip(state, text_state, where=str(weights))
    predictor = box_predictor(state, str(weights)) if kind == "regionclip-finetuned" else None

    rpn_state = state if Path(rpn).resolve() == Path(weights).resolve() else read_file(rpn)
    if detect_kind(rpn_state) not in ("rpn", "regionclip-pretrained", "regionclip-finetuned"):
        expect(rpn_state, rpn, "rpn")  # raises, naming what the file is
    det_state, layout = convert_rpn(rpn_state, where=str(rpn))
    detector = next(k for k, v in DETECTORS.items() if v == layout)

    clip_model = clip_model_name(clip_config)
    if clip_model not in open_clip.list_models():
        register_clip_config(clip_model, clip_config)
    build_clip(clip_model, clip_state, weights)  # raises if anything does not fit
    build_rpn_detector(layout, det_state, where=str(rpn))

    recipe = _recipe(kind, predictor)
    arch = clip_model.removesuffix("-quickgelu").lower()
    name = name or f"regionclip-{arch}-{'cc' if recipe == 'zero-shot' else recipe.split('-')[1]}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, preset_path = (out / f"{name}.pt").resolve(), (out / f"{name}.yaml").resolve()
    cfg = preset_config(name, clip_model, detector, ckpt_path, recipe)

    def cast(d: dict) -> dict:
        return {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in d.items()}

    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": to_dict(cfg),
        "clip_model_config": clip_config,
        "clip": cast(clip_state),
        "detector": cast(det_state),
        "detector_layout": layout,
        "source": {"weights": Path(weights).name, "rpn": Path(rpn).name, "kind": kind, "recipe": recipe,
                   "text_from": Path(text_from).name if text_from else None},
    }
    if predictor is not None:
        ckpt["box_predictor"] = predictor
    _save_atomic(ckpt, ckpt_path)
    header = (
        f"# RegionCLIP {recipe} model imported by regionclip.zoo.import_regionclip from\n"
        f"#   {Path(weights).name} (CLIP {clip_model}), RPN {Path(rpn).name} (detectron2 R50-{layout.upper()})"
        f"{', text tower ' + Path(text_from).name if text_from else ''}.\n"
        "# Settings are RegionCLIP's test-time ones (regionclip/zoo/importer.py RECIPES).\n"
    )
    _save_atomic(header + yaml.safe_dump(to_dict(cfg), sort_keys=False), preset_path)
    return Imported(ckpt_path, preset_path, recipe, clip_model, detector)


def read_imported(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by ``import_regionclip`` (weights_only) and check its format."""
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "detector_layout" not in ckpt:
        raise WeightsUnavailable(f"{path}: not a checkpoint written by regionclip.zoo.import_regionclip")
    return ckpt
