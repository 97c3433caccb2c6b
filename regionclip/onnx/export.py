"""``export_onnx``: a ``RegionCLIP`` model -> four ONNX graphs (five with a second stage) and ``manifest.json``.

The torch modules traced for each graph are in ``graphs.py``.

Graphs (inputs -> outputs; every listed size is dynamic):

- ``proposals.onnx``: ``image`` (1, 3, H, W), detector-normalised, resized and zero-padded to
  multiples of 32 -> per feature level ``objectness_i`` (1, A, h_i, w_i) and ``deltas_i``
  (1, 4A, h_i, w_i): the backbone and the RPN head. Anchors, box decoding, top-k, NMS and the
  resize run in numpy (``ops.py``, ``runtime.py``), mirroring torchvision's code: their shapes
  depend on the data, which is where Faster R-CNN exports break (pytorch/vision #8937, #2311).
- ``second_stage.onnx`` (``proposals.source=refined`` only): the backbone maps the box head pools
  from (extra ``feature_<name>`` outputs of the proposal graph) and ``boxes`` (N, 4) after the
  RPN's NMS -> ``class_logits`` and ``box_regression``: multi-scale RoIAlign, the box head and the
  predictor; the runtime picks each box's class, decodes and clips (``ProposalStage._refined_boxes``).
- ``regions.onnx``: ``image`` (1, 3, H, W) CLIP-normalised and ``boxes`` (N, 4) -> ``embeddings``
  (N, D), unit norm, and for a model that refines boxes (``RegionCLIP.refines_boxes``) ``deltas``
  (N, 4): its box head on the raw features of the same regions (``BoxRefiner.forward``); the
  runtime decodes them onto the proposals and clips (``manifest["box_head"]``). Crop mode:
  ``RoiAlign`` (opset 16, ``half_pixel`` = torchvision's ``aligned=True``) of the given square
  boxes to the tower's input size, then the tower; the runtime squares and enlarges the boxes
  and picks each box's pyramid level (``CropEncoder`` halves the image for boxes over 4x the
  input size). Pool mode: the encoder's dense pass and
  per-box pooling (``pool``) on the image resized and padded by the runtime.
- ``text.onnx``: ``tokens`` (B, context) int64 -> ``features`` (B, D), not normalised (the
  runtime averages prompt templates the way ``text.ensemble`` says).
- ``scoring.onnx``: ``regions`` (N, D) and ``text`` (L, D) -> ``logits`` (N, L [+1]) and
  ``probabilities`` (N, L): ``scoring.region_logits`` with the model's logit scale and
  background column, then the softmax. L is an input size, so labels change without re-export.

Exporter: the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``), chosen on
torch 2.14.1 by trying both on these graphs (2-core CPU):

- On the demo model both give graphs that match torch (within 6e-5) at sizes other than the
  example's, RoiAlign included. The dynamo exporter needs more care for that: torch.export guards
  on the dynamic sizes (the MobileNet-FPN proposal graph failed with "Constraints violated (h, w)"
  until the smallest image side was declared as 65 px, a limit the trace invented).
- Export time: the demo model's four graphs took 2.9 s (verification included) against about
  40 s with dynamo (22 s for the proposal graph alone, most of it in decompositions, plus 5 s
  to import onnxscript). The real presets take 13-76 s with this exporter (fast, rn50, vitb16);
  dynamo would make every export, and the tests, many times slower on the CPUs this project
  runs on.
- The ViT pool encoder (``fast`` preset), whose token count follows the image size, broke both:
  dynamo fixed the image height at the example's in the graph, and the tracer baked the token
  count into ``nn.MultiheadAttention``'s reshapes. The tracer's failure has a local fix (the
  same attention written without that reshape while exporting, ``PoolGraph.traceable``); the
  dynamo one was not chased further.
- It needs no package besides onnx; dynamo also needs onnxscript.
- Drawbacks, accepted: torch deprecates it (a DeprecationWarning since 2.9; silenced here with
  the tracer's warnings about Python values), and the output shapes it records can carry wrong
  symbolic names (harmless: onnxruntime computes shapes). Since the tracer bakes Python numbers
  computed from sizes into the graph, every graph runs in onnxruntime at a second input size
  after export and must match torch (``_verify``), which is how the ViT problem showed. If a
  torch release drops this exporter, ``_export_graph`` is the one place to switch
  (``dynamo=True``, ``dynamic_shapes`` with multiples of 32 for image sides, opset 18).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import tokenizer as clip_tokenizer
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..atomic import atomic_path
from ..box_head import BoxRefiner
from ..config import to_dict
from ..model import RegionCLIPModel as RegionCLIP
from ..errors import BadConfig, BadOutput
from ..regions import CropEncoder
from . import ops, require
from .manifest import FORMAT, GRAPHS, MANIFEST, OPSET, SECOND_STAGE, file_digest, write_manifest
from .graphs import CropGraph, PoolGraph, ProposalGraph, ScoringGraph, SecondStageGraph, TextGraph
from .tokenizer import BPE_FILE

DISTRACTORS_FILE = "distractors.npy"

EXPORTER = "torchscript"


def check_exportable(model: RegionCLIP) -> None:
    """Raise ``BadConfig`` naming what this exporter does not handle yet."""
    cfg, det = model.cfg, model.proposals.detector
    why = None
    if type(det.transform) is not GeneralizedRCNNTransform or type(det.rpn.anchor_generator) is not AnchorGenerator:
        why = f"detector {cfg.detector} (detectron2 conventions) is not supported; torchvision Faster R-CNNs are"
    elif det.transform.fixed_size is not None:
        why = "a detector with a fixed input size is not supported"
    elif cfg.proposals.source == "final":
        why = "proposals.source=final (the detector's classifier) is not supported: use proposals.source=rpn or refined"
    elif model.refines_boxes and not isinstance(model.box_head, BoxRefiner):
        why = f"the box head {type(model.box_head).__name__} is not a BoxRefiner: set regions.box_refinement=false"
    elif cfg.scoring.recipe != "default":
        why = f"scoring.recipe={cfg.scoring.recipe} is not supported: use scoring.recipe=default"
    elif cfg.text.ensemble != "normalized":
        why = f"text.ensemble={cfg.text.ensemble} is not supported: use text.ensemble=normalized"
    elif not _plain_tokenizer(model.text.tokenizer):
        why = f"the tokenizer of {cfg.clip_model} is not open_clip's SimpleTokenizer with its defaults"
    if why:
        raise BadConfig(f"cannot export {cfg.name} to ONNX: {why}")


def _plain_tokenizer(tok) -> bool:
    return (type(tok) is clip_tokenizer.SimpleTokenizer and tok.reduction_fn is None
            and tok.clean_fn is clip_tokenizer._clean_lower and len(tok.encoder) == 49408)


def export_onnx(model: RegionCLIP, out_dir: str | os.PathLike, opset: int = OPSET, verify: bool = True) -> Path:
    """Write ``model``'s graphs, the tokenizer's merges file and ``manifest.json`` into ``out_dir``
    (created; files there of the same names are replaced). Returns the manifest's path.

    With ``verify`` each graph runs in onnxruntime at a size other than the one it was traced
    at and must match torch (``BadConfig`` naming the graph otherwise). Raises ``BadConfig`` for
    models the exporter does not handle (``check_exportable``), ``OnnxUnavailable`` without
    onnx / onnxruntime, ``BadOutput`` for an unusable ``out_dir``.
    """
    require("onnx")
    if verify:
        require("onnxruntime")
    check_exportable(model)
    if opset < 16:
        raise BadConfig(f"opset {opset} has no aligned RoiAlign: use opset 16 or later")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadOutput(f"{out} is a file, not a folder: pass a folder to write the ONNX export into")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an export that fails half-way leaves no loadable folder
    model.eval()
    graphs = {}
    for name, (module, examples, inputs, outputs, axes) in _graph_specs(model).items():
        # A new wrapper module is in training mode, and the exporter restores that mode on it,
        # i.e. on the model's own submodules (BatchNorm would then use batch statistics).
        module.eval()
        path = out / (GRAPHS[name][0] if name in GRAPHS else SECOND_STAGE[1])
        with getattr(module, "traceable", contextlib.nullcontext)():
            _export_graph(module, examples[0], path, inputs, outputs, axes, opset)
        if verify:
            _verify(name, module, examples, path, inputs)
        graphs[name] = {"file": path.name, "sha256": file_digest(path), "inputs": inputs, "outputs": outputs}
    bpe = Path(clip_tokenizer.default_bpe())
    shutil.copyfile(bpe, out / BPE_FILE)
    manifest = _manifest(model, opset, graphs)
    manifest["tokenizer"] = {"file": BPE_FILE, "sha256": file_digest(out / BPE_FILE),
                             "context_length": int(model.text.tokenizer.context_length)}
    manifest["distractors"] = _write_distractors(model, out)
    return write_manifest(out, manifest)


def _write_distractors(model: RegionCLIP, out: Path) -> dict:
    """The model's default distractors (``regionclip.distractors``) as the export carries them:
    their names, and their embeddings in ``distractors.npy`` ((N, D) float32 unit rows), so the
    runtime scores them without encoding a name. An empty list writes no file."""
    from .. import distractors as D

    names = D.model_names(model.predictor.backend)
    (out / DISTRACTORS_FILE).unlink(missing_ok=True)
    if not names:
        return {"names": []}
    emb = D.embeddings(model.predictor.backend, names).float().cpu().numpy()
    np.save(out / DISTRACTORS_FILE, emb.astype(np.float32))
    return {"names": names, "file": DISTRACTORS_FILE, "sha256": file_digest(out / DISTRACTORS_FILE)}


def _graph_specs(model: RegionCLIP) -> dict:
    """name -> (module, [traced args, check args...], input names, output names, dynamic axes)."""
    dev = model.device
    gen = torch.Generator().manual_seed(0)  # examples that leave the caller's random state alone

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dev)

    det = model.proposals.detector
    levels = len(det.rpn.anchor_generator.cell_anchors)
    size_a, size_b = randn(*_detector_input(model, 480, 640)), randn(*_detector_input(model, 360, 270))
    prop_out = [f"objectness_{i}" for i in range(levels)] + [f"deltas_{i}" for i in range(levels)]
    features = _second_stage_maps(model)
    feature_out = [f"feature_{n}" for n in features]
    image_axes = {"image": {2: "height", 3: "width"}}
    boxes_a = torch.tensor([[4.0, 6.0, 60.0, 50.0], [-8.0, -8.0, 40.0, 40.0], [30.0, 20.0, 31.0, 20.5]], device=dev)
    boxes_b = torch.tensor([[10.0, 10.0, 90.0, 70.0], [0.0, 0.0, 200.0, 150.0]], device=dev)
    box_head = model.box_head if model.refines_boxes else None
    if isinstance(model.regions, CropEncoder):
        regions_mod = CropGraph(model.regions, box_head)
        reg_a, reg_b = randn(1, 3, 96, 128), randn(1, 3, 150, 200)
    else:
        regions_mod = PoolGraph(model.regions, box_head)
        stride = model.regions.stride
        reg_a, reg_b = randn(1, 3, 7 * stride, 10 * stride), randn(1, 3, 9 * stride, 6 * stride)
    region_out = ["embeddings", "deltas"] if box_head is not None else ["embeddings"]
    tok = model.text.tokenizer
    tokens_a = tok(["a photo of a dog.", "a cat.", "there is a bicycle in the scene."]).to(dev)
    tokens_b = tok(["a very small red traffic light on a pole."]).to(dev)
    dim = model.regions.embed_dim()
    text_a, text_b = F.normalize(randn(5, dim), dim=-1), F.normalize(randn(2, dim), dim=-1)
    specs = {
        "proposals": (ProposalGraph(det, features), [(size_a,), (size_b,)], ["image"], prop_out + feature_out,
                      {**image_axes, **{n: {2: f"{n}_h", 3: f"{n}_w"} for n in feature_out}}),
        "regions": (regions_mod, [(reg_a, boxes_a), (reg_b, boxes_b)], ["image", "boxes"], region_out,
                    {**image_axes, **{n: {0: "boxes"} for n in ["boxes", *region_out]}}),
        "text": (TextGraph(model.clip), [(tokens_a,), (tokens_b,)], ["tokens"], ["features"],
                 {"tokens": {0: "prompts"}, "features": {0: "prompts"}}),
        "scoring": (ScoringGraph(model),
                    [(randn(4, dim), text_a), (randn(7, dim), text_b)],
                    ["regions", "text"], ["logits", "probabilities"],
                    {"regions": {0: "boxes"}, "text": {0: "labels"}, "logits": {0: "boxes", 1: "columns"},
                     "probabilities": {0: "boxes", 1: "labels"}}),
    }
    if features:
        graph = SecondStageGraph(det.roi_heads, features, tuple(size_a.shape[-2:]))
        with torch.no_grad():
            maps_a, maps_b = (det.backbone(x) for x in (size_a, size_b))
        # Boxes in detector-input pixels: small to large, so every pyramid level is used.
        boxes_c = torch.tensor([[10.0, 12.0, 40.0, 30.0], [0.0, 0.0, 300.0, 220.0], [50.0, 40.0, 150.0, 170.0]], device=dev)
        examples = [(*(maps_a[n] for n in features), boxes_c), (*(maps_b[n] for n in features), boxes_b)]
        specs["second_stage"] = (graph, examples, feature_out + ["boxes"], ["class_logits", "box_regression"],
                                 {**{n: {2: f"{n}_h", 3: f"{n}_w"} for n in feature_out},
                                  **{n: {0: "boxes"} for n in ["boxes", "class_logits", "box_regression"]}})
    return specs


def _second_stage_maps(model: RegionCLIP) -> list[str]:
    """The backbone maps the second stage pools from, when the model refines its proposals."""
    if model.cfg.proposals.source != "refined":
        return []
    det = model.proposals.detector
    with torch.no_grad():
        names = list(det.backbone(torch.zeros(1, 3, 64, 64, device=model.device)).keys())
    return [n for n in det.roi_heads.box_roi_pool.featmap_names if n in names]


def _detector_input(model: RegionCLIP, h: int, w: int) -> tuple[int, int, int, int]:
    """The shape of the proposal graph's input for an h x w image."""
    t = model.proposals.detector.transform
    nh, nw = ops.detector_size(h, w, int(t.min_size[-1]), int(t.max_size))
    d = int(t.size_divisible)
    return 1, 3, -(-nh // d) * d, -(-nw // d) * d


def _export_graph(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                  axes: dict, opset: int) -> None:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path (a fused op) has no ONNX translation.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            # Known and checked by _verify: the tracer's notes on Python values, the exporter's deprecation.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx\..*")
            # torchvision's note that sampling_ratio -1 is written as 0: both mean adaptive sampling.
            warnings.filterwarnings("ignore", message="ONNX export for RoIAlign")
            torch.onnx.export(module, args, str(tmp), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _verify(name: str, module: nn.Module, examples: list[tuple], path: Path, inputs: list[str]) -> None:
    """Run the graph in onnxruntime on each example (the traced one and one of other sizes) and
    compare with torch: a size the tracer baked in fails here, not in a user's detection."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for args in examples:
        sizes = [tuple(a.shape) for a in args]
        try:
            got = session.run(None, {n: a.detach().cpu().numpy() for n, a in zip(inputs, args)})
        except Exception as exc:  # onnxruntime's own error types
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise BadConfig(f"the exported {name} graph fails at input sizes {sizes} ({first}); "
                            "please report this model") from None
        with torch.no_grad():
            want = module(*args)
        for g, w in zip(got, want if isinstance(want, tuple) else (want,)):
            w = w.float().cpu().numpy()
            scale = max(1.0, float(np.abs(w).max()) if w.size else 1.0)
            if g.shape != w.shape or (w.size and float(np.abs(g - w).max()) > 1e-3 * scale):
                diff = float(np.abs(g - w).max()) if g.shape == w.shape else f"shape {g.shape} vs {w.shape}"
                raise BadConfig(f"the exported {name} graph does not reproduce torch at input sizes {sizes} "
                                f"(max difference {diff}); please report this model")


def _manifest(model: RegionCLIP, opset: int, graphs: dict) -> dict:
    cfg, det = model.cfg, model.proposals.detector
    t, rpn, enc = det.transform, det.rpn, model.regions
    regions = {"mode": cfg.mode, "mean": enc.mean.flatten().tolist(), "std": enc.std.flatten().tolist(),
               "embed_dim": enc.embed_dim()}
    if isinstance(enc, CropEncoder):
        regions.update(input_size=enc.input_size, crop_scale=cfg.regions.crop_scale,
                       crop_batch_size=cfg.regions.crop_batch_size)
    else:
        regions.update(short_side=cfg.regions.pool_short_side, max_side=cfg.regions.pool_max_side, stride=enc.stride)
    return {
        "format": FORMAT,
        "preset": cfg.name,
        "config": to_dict(cfg),
        "versions": {"regionclip": _version("regionclip"), "torch": torch.__version__,
                     "torchvision": _version("torchvision"), "open_clip": open_clip.__version__,
                     "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"), "opset": opset,
                     "exporter": EXPORTER},
        "graphs": graphs,
        "input": {
            "pixels": "RGB, float32 = uint8 / 255, (3, h, w)",
            "max_side": model.input_max_side,
            "rules": [
                "decoded images whose long side is over max_side are shrunk to it (area interpolation); "
                "boxes come back scaled to the original size",
                "proposals.onnx: normalise with proposals.mean/std, resize (bilinear, half-pixel) by "
                "min(min_size / short side, max_size / long side) with each side floored, zero-pad bottom/right "
                "to multiples of size_divisible",
                "regions.onnx, crop: normalise with regions.mean/std; boxes squared on their long side and "
                "scaled by crop_scale; a square over 4 x input_size is cut from the image average-pooled 2^k times "
                "(2x2, ceil mode), its box divided by 2^k",
                "regions.onnx, pool: resize by min(short_side / short side, max_side / long side), sides rounded, "
                "antialiased when shrinking, then normalise and zero-pad to multiples of stride; boxes scaled alike",
            ],
        },
        "proposals": {
            "min_size": int(t.min_size[-1]), "max_size": int(t.max_size), "size_divisible": int(t.size_divisible),
            "mean": [float(v) for v in t.image_mean], "std": [float(v) for v in t.image_std],
            "cell_anchors": [a.cpu().tolist() for a in rpn.anchor_generator.cell_anchors],
            "box_coder_weights": list(rpn.box_coder.weights), "box_coder_clip": float(rpn.box_coder.bbox_xform_clip),
            "pre_nms_top_n": int(rpn.pre_nms_top_n()), "post_nms_top_n": int(rpn.post_nms_top_n()),
            "nms_threshold": float(rpn.nms_thresh), "score_threshold": float(rpn.score_thresh),
            "min_box_size": float(rpn.min_size),
        },
        "regions": regions,
        "box_head": _box_head(model),
        "second_stage": _second_stage(model),
        "text": {"templates": list(cfg.text.templates), "ensemble": cfg.text.ensemble},
        "scoring": {**dataclasses.asdict(cfg.scoring), "logit_scale": model.logit_scale},
    }


def _box_head(model: RegionCLIP) -> dict | None:
    """What the runtime needs to apply the regions graph's ``deltas`` (None: the model does not
    refine boxes, and the graph has no such output)."""
    if not model.refines_boxes:
        return None
    head = model.box_head
    return {
        "output": "deltas",
        "hidden": int(head.bbox_pred.in_features) if not isinstance(head.mlp, nn.Identity) else 0,
        "box_coder_weights": [float(v) for v in head.coder.weights],
        "box_coder_clip": float(head.coder.bbox_xform_clip),
        "rule": "RegionCLIP.detect_batch: the proposals' deltas (read from their raw region features) are "
                "decoded onto them with BoxCoder.decode_single(box_coder_weights, box_coder_clip), in the "
                "image's pixels, then clipped to the image; the refined boxes are not embedded again: "
                "each keeps the scores of its proposal's embedding and the proposal's objectness, and "
                "the scoring NMS runs on the refined boxes",
    }


def _second_stage(model: RegionCLIP) -> dict | None:
    """What the runtime needs to apply ``second_stage.onnx`` (None: the proposals are the RPN's)."""
    if model.cfg.proposals.source != "refined":
        return None
    heads = model.proposals.detector.roi_heads
    return {
        "box_coder_weights": [float(v) for v in heads.box_coder.weights],
        "box_coder_clip": float(heads.box_coder.bbox_xform_clip),
        "rule": "ProposalStage._refined_boxes: after the RPN's NMS, the proposals (detector-input pixels) and "
                "the proposal graph's feature_* outputs go through second_stage.onnx; each box takes the "
                "box_regression of its highest class_logits column past the first (background), decoded with "
                "BoxCoder.decode_single(box_coder_weights, box_coder_clip) and clipped to the resized image, "
                "then scaled to the original; it keeps its RPN objectness",
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
