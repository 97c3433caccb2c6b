"""``OnnxDetector``: an ONNX export (``export_onnx``) run with onnxruntime and numpy, no torch.

The predictor's second backend: ``RegionCLIP.from_onnx(DIR)`` (``Predictor.from_onnx``) puts a
``Predictor`` over it, which decodes, streams and calls ``detect_chunk``; ``predict`` runs one
decoded image without torch.

The same stages as ``RegionCLIP`` for one image at a time: ``propose`` -> ``embed`` (->
``refine`` for an export with a box head) -> ``probabilities`` (the scoring graph over any
vocabulary) -> ``postprocess``. Labels are encoded by the exported text graph and cached per
label, or come from an embeddings array / file, so a new vocabulary never needs a new export.
``predict`` is the torch-free entry point (numpy in, numpy out).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..config import ScoringConfig, check_scoring
from ..errors import BadInput, WeightsUnavailable
from ..labels import check_labels
from . import ops, require
from .manifest import graph_inputs, graph_names, graph_outputs, read_manifest
from .tokenizer import ClipTokenizer

F32 = np.float32
_REEXPORT = "export it again: regionclip export --model MODEL --format onnx --out DIR"


class OnnxDetector:
    """Open-vocabulary detection from an ONNX export folder, on onnxruntime.

    ``device``: ``cpu`` or ``cuda`` (onnxruntime's CUDA provider, from the onnxruntime-gpu
    package), ``auto`` for CUDA when that provider is there; ``threads``: onnxruntime's threads
    per graph (default: its own choice). ``verify`` checks each file's SHA-256 against the
    manifest first (about 2 s per GB on 2 busy CPU cores). Raises ``WeightsUnavailable`` (one
    line) for a folder that is not a complete, matching export, ``OnnxUnavailable`` without
    onnxruntime.
    """

    def __init__(self, folder: str | os.PathLike, device: str | None = "cpu", threads: int | None = None,
                 verify: bool = True):
        ort = require("onnxruntime")
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder, verify=verify)
        self.providers = _providers(ort, device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.sessions = {name: self._session(ort, opts, name) for name in graph_names(m)}
        self.tokenizer = ClipTokenizer(self.folder / m["tokenizer"]["file"], m["tokenizer"]["context_length"])
        self.labels_encoded = 0  # label embeddings computed by the text graph (the rest came from the cache)
        self._text_cache: dict[str, np.ndarray] = {}
        # The exported model's default distractors (regionclip.distractors), embedded at export.
        d = m.get("distractors") or {}
        self.distractor_names = list(d.get("names") or [])
        self.distractor_embeddings = (np.load(self.folder / d["file"]).astype(F32) if self.distractor_names
                                      else None)

    def _session(self, ort, opts, name: str):
        entry = self.manifest["graphs"][name]
        path = self.folder / entry["file"]
        if not path.is_file():
            raise WeightsUnavailable(f"{path} is missing from the ONNX export: {_REEXPORT}")
        try:
            session = ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own pybind types
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise WeightsUnavailable(f"{path}: onnxruntime cannot load it ({first}): {_REEXPORT}") from None
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        want_out = graph_outputs(self.manifest, name)
        want_in = graph_inputs(self.manifest, name)
        if inputs != want_in or outputs != want_out:
            raise WeightsUnavailable(f"{path} is not a {name} graph of this export (inputs {inputs}, outputs "
                                     f"{outputs}; expected {want_in}, {want_out}): {_REEXPORT}")
        return session

    # ------------------------------------------------------------------------------ settings
    @property
    def embed_dim(self) -> int:
        return int(self.manifest["regions"]["embed_dim"])

    @property
    def refines_boxes(self) -> bool:
        """Whether the export moves proposals with its box head (``RegionCLIP.refines_boxes``)."""
        return bool(self.manifest.get("box_head"))

    @property
    def input_max_side(self) -> int | None:
        """The longest side decoded images keep (``RegionCLIP.input_max_side`` at export)."""
        return self.manifest["input"]["max_side"]

    def scoring_config(self, **overrides) -> ScoringConfig:
        """The exported model's scoring with the non-None ``overrides`` applied, checked."""
        known = {f.name for f in dataclasses.fields(ScoringConfig)}
        stored = {k: v for k, v in self.manifest["scoring"].items() if k in known}
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return check_scoring(ScoringConfig(**{**stored, **given}))
        except TypeError as exc:
            raise BadInput(f"unknown scoring option: {exc}") from None

    # -------------------------------------------------------------------------------- stages
    def _run(self, name: str, feeds: dict) -> list[np.ndarray]:
        return self.sessions[name].run(None, feeds)

    def propose(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 (``ProposalStage`` with ``source=rpn``): (3, h, w) float32 RGB in [0, 1] ->
        ``(boxes (K, 4) xyxy in its pixels, objectness (K,) sigmoid probabilities)``, K <= the
        export's ``num_proposals``, best first."""
        p = self.manifest["proposals"]
        h, w = image.shape[1:]
        nh, nw = ops.detector_size(h, w, p["min_size"], p["max_size"])
        x = ops.pad_to(ops.resize_bilinear(ops.normalize(image, p["mean"], p["std"]), (nh, nw)), p["size_divisible"])
        outs = self._run("proposals", {"image": x[None]})
        levels = len(p["cell_anchors"])
        logits = [o[0].transpose(1, 2, 0).reshape(-1) for o in outs[:levels]]  # (h, w, A): torchvision's order
        deltas = [d[0].reshape(-1, 4, *d.shape[-2:]).transpose(2, 3, 0, 1).reshape(-1, 4) for d in outs[levels:2 * levels]]
        anchors = ops.grid_anchors(p["cell_anchors"], [o.shape[-2:] for o in outs[:levels]], x.shape[1:])
        boxes = ops.decode_boxes(np.concatenate(deltas), anchors, p["box_coder_weights"], p["box_coder_clip"])
        logit = _mask_padding(np.concatenate(logits), anchors, (nh, nw), p["size_divisible"])
        # Per level the best pre_nms_top_n, as RegionProposalNetwork._get_top_n_idx.
        picked, start = [], 0
        for n in (len(v) for v in logits):
            picked.append(start + ops.topk_desc(logit[start:start + n], p["pre_nms_top_n"]))
            start += n
        top = np.concatenate(picked)
        level = np.repeat(np.arange(levels), [len(i) for i in picked])
        boxes, logit = ops.clip_boxes(boxes[top], (nh, nw)), logit[top]
        ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (ws >= p["min_box_size"]) & (hs >= p["min_box_size"])
        keep &= (ops.sigmoid(logit) >= p["score_threshold"]) & (logit > -np.inf)
        boxes, logit, level = boxes[keep], logit[keep], level[keep]
        keep = ops.batched_nms(boxes, logit, level, p["nms_threshold"])[: p["post_nms_top_n"]]
        boxes = boxes[keep]
        if self.manifest.get("second_stage") and len(boxes):
            boxes = self._second_stage(outs[2 * levels:], boxes, (nh, nw))
        ratio = np.array([w, h, w, h], dtype=F32) / np.array([nw, nh, nw, nh], dtype=F32)
        return ops.clip_boxes(boxes * ratio, (h, w)), ops.sigmoid(logit[keep])

    def _second_stage(self, features: list[np.ndarray], boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``ProposalStage._refined_boxes``: the detector's second stage on the proposal graph's
        feature maps; each box moved by the regression of its most likely object class, clipped."""
        s = self.manifest["second_stage"]
        names = graph_inputs(self.manifest, "second_stage")
        logits, regression = self._run("second_stage", {**dict(zip(names, features)), "boxes": boxes.astype(F32)})
        best = logits[:, 1:].argmax(axis=1) + 1
        deltas = regression.reshape(len(boxes), -1, 4)[np.arange(len(boxes)), best]
        return ops.clip_boxes(ops.decode_boxes(deltas, boxes, s["box_coder_weights"], s["box_coder_clip"]), size)

    def embed(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2: (3, h, w) float32 in [0, 1] and (N, 4) xyxy boxes in its pixels -> (N, D)
        unit-norm region embeddings (``RegionCLIP.embed``)."""
        return self.embed_with_deltas(image, boxes)[0]

    def embed_with_deltas(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``embed``, and the box head's (N, 4) deltas for the same boxes when the export refines
        boxes (None otherwise): one pass of the regions graph gives both."""
        r = self.manifest["regions"]
        boxes = np.asarray(boxes, dtype=F32).reshape(-1, 4)
        if not len(boxes):
            empty = np.zeros((0, self.embed_dim), dtype=F32)
            return empty, (np.zeros((0, 4), dtype=F32) if self.refines_boxes else None)
        if r["mode"] == "crop":
            outs = self._embed_crops(ops.normalize(image, r["mean"], r["std"]), boxes)
        else:
            h, w = image.shape[1:]
            nh, nw = ops.pool_size(h, w, r["short_side"], r["max_side"])
            shrink = min(r["short_side"] / min(h, w), r["max_side"] / max(h, w)) < 1
            x = ops.normalize(ops.resize_bilinear(image, (nh, nw), antialias=shrink), r["mean"], r["std"])
            scale = np.array([nw / w, nh / h, nw / w, nh / h], dtype=F32)
            outs = self._run("regions", {"image": ops.pad_to(x, r["stride"])[None], "boxes": boxes * scale})
        return outs[0], (outs[1] if self.refines_boxes else None)

    def embed_exemplars(self, image, boxes_xyxy) -> np.ndarray:
        """(N, D) unit-norm embeddings of ``boxes_xyxy`` (N, 4, original pixels) in ``image`` (a path
        or any ``io.ImageSource``) through the exported region graph, as detections' regions are:
        a new example image needs no new export."""
        from ..io import load_reduced

        loaded = load_reduced(image, self.input_max_side)
        h, w = loaded.pixels.shape[:2]
        oh, ow = loaded.original_size
        scale = np.array([w / ow, h / oh, w / ow, h / oh], dtype=F32)
        x = np.ascontiguousarray(loaded.pixels.transpose(2, 0, 1)).astype(F32) / F32(255)
        return self.embed(x, np.asarray(boxes_xyxy, dtype=F32).reshape(-1, 4) * scale)

    def refine(self, boxes: np.ndarray, deltas: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Stage 2b (``RegionCLIP.refine``): (N, 4) xyxy boxes moved by their (N, 4) box-head
        ``deltas`` (``BoxCoder.decode_single``, size deltas clamped) and clipped to ``size`` (h, w)."""
        head = self.manifest["box_head"]
        moved = ops.decode_boxes(deltas.astype(F32), boxes.astype(F32), head["box_coder_weights"],
                                 head["box_coder_clip"])
        return ops.clip_boxes(moved, size)

    def _embed_crops(self, x: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
        """``CropEncoder``: boxes squared on their long side and enlarged by ``crop_scale``; a box
        over 4x the crop size is cut from the image averaged down 2^k times (k as small as keeps it
        under), so no crop reads more than 16 points per pixel. The graph cuts and embeds (and
        gives the box head's deltas); returns the graph's outputs for all boxes, in their order."""
        r = self.manifest["regions"]
        s = r["input_size"]
        centre = (boxes[:, :2] + boxes[:, 2:]) / F32(2)
        side = np.maximum((boxes[:, 2:] - boxes[:, :2]).max(axis=1, keepdims=True), F32(1))
        half = side * F32(r["crop_scale"]) / F32(2)
        squares = np.concatenate([centre - half, centre + half], axis=1)
        with np.errstate(divide="ignore"):
            level = np.maximum(np.ceil(np.log2((squares[:, 2] - squares[:, 0]) / F32(4 * s))), 0).astype(np.int64)
        out = [np.empty((len(boxes), self.embed_dim), dtype=F32)]
        if self.refines_boxes:
            out.append(np.empty((len(boxes), 4), dtype=F32))
        step = max(1, int(r["crop_batch_size"]))
        for k in range(int(level.max()) + 1):
            if k:
                x = ops.avg_pool2(x)
            pick = np.nonzero(level == k)[0]
            for start in range(0, len(pick), step):
                idx = pick[start:start + step]
                for dst, got in zip(out, self._run("regions", {"image": x[None], "boxes": squares[idx] / F32(2 ** k)})):
                    dst[idx] = got
        return out

    def encode_text(self, labels: Sequence[str]) -> np.ndarray:
        """(L, D) unit-norm label embeddings from the text graph: each label through the export's
        templates, each prompt normalised, averaged, renormalised (``text.ensemble: normalized``).
        Cached per label for the detector's lifetime."""
        labels = check_labels(labels)
        missing = [lb for lb in dict.fromkeys(labels) if lb not in self._text_cache]
        if missing:
            templates = self.manifest["text"]["templates"]
            prompts = [t.format(lb) for lb in missing for t in templates]
            chunk = max(1, int(self.manifest["config"]["text"].get("chunk_size", 512)))
            feats = np.concatenate([self._run("text", {"tokens": self.tokenizer(prompts[i:i + chunk])})[0]
                                    for i in range(0, len(prompts), chunk)])
            emb = ops.l2_normalize(ops.l2_normalize(feats).reshape(len(missing), len(templates), -1).mean(axis=1))
            self._text_cache.update(zip(missing, emb.astype(F32)))
            self.labels_encoded += len(missing)
        return np.stack([self._text_cache[lb] for lb in labels])

    def vocabulary(self, labels: Sequence[str] | None, text_embeddings=None) -> tuple[list[str], np.ndarray]:
        """``(labels, (L, D) unit-norm embeddings)``: ``labels`` through the text graph, or the rows
        of ``text_embeddings`` (an (L, D) array or tensor, a ``.npy`` file, or a RegionCLIP concept
        file, which needs torch to read), one per label (``labels`` None: "0", "1", ...)."""
        if text_embeddings is None:
            if labels is None:
                raise BadInput("pass labels (a list of names) or text_embeddings (an (L, D) array or .npy file)")
            labels = check_labels(labels)
            return labels, self.encode_text(labels)
        emb = _read_embeddings(text_embeddings)
        labels = check_labels(labels) if labels is not None else [str(i) for i in range(len(emb))]
        if len(emb) != len(labels):
            raise BadInput(f"text embeddings hold {len(emb)} rows but {len(labels)} labels were given: "
                           "one row per label")
        if emb.shape[1] != self.embed_dim:
            raise BadInput(f"text embeddings have dimension {emb.shape[1]} but this export embeds to {self.embed_dim}")
        return labels, emb

    def probabilities(self, regions: np.ndarray, text: np.ndarray) -> np.ndarray:
        """Stage 3: (N, D) regions x (L, D) label embeddings -> (N, L) softmax probabilities
        (background column dropped when the model scores one)."""
        if not len(regions):
            return np.zeros((0, len(text)), dtype=F32)
        return self._run("scoring", {"regions": regions.astype(F32), "text": text.astype(F32)})[1]

    def postprocess(self, boxes: np.ndarray, objectness: np.ndarray | None, probs: np.ndarray,
                    scoring: ScoringConfig, rules=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage 4 (``scoring.probabilities`` fusion + ``scoring.select``): per box its top-k labels,
        score threshold, per-label NMS, the label-blind NMS when on, ``max_detections``.
        Returns ``(boxes_xyxy (K, 4), scores (K,), label_ids (K,) int64)``, best first.
        ``rules`` (``exemplars.VocabRules``), as ``scoring.select``: a box whose best column is one
        of the last ``rules.extra`` (negatives, distractors) suppresses in both NMS, then goes with
        every extra label (kept, ids past the classes', under ``report_extra``); each class has its
        own threshold."""
        extra = rules.extra if rules is not None else 0
        classes = probs.shape[1] - extra
        thr = np.full(probs.shape[1], scoring.score_threshold, dtype=F32)
        if rules is not None:
            thr[:classes] = rules.threshold_list(scoring.score_threshold, classes)
        w = scoring.objectness_weight
        if objectness is not None and w > 0:
            probs = probs ** (1 - w) * np.maximum(objectness, F32(0))[:, None] ** w
        k = max(1, min(scoring.top_k, probs.shape[1]))
        label_ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(probs, label_ids, axis=1).reshape(-1)
        won = np.repeat(label_ids[:, 0] >= classes, k)
        label_ids = label_ids.reshape(-1)
        boxes = np.repeat(boxes, k, axis=0)
        keep = np.nonzero(scores >= thr[label_ids])[0]
        keep = keep[ops.batched_nms(boxes[keep], scores[keep], label_ids[keep], scoring.nms_iou)]
        if scoring.agnostic_nms:
            keep = keep[ops.nms(boxes[keep], scores[keep], scoring.agnostic_nms_iou)]
        if extra and scoring.report_extra:  # calibration: the extra rows' boxes stay
            keep = keep[~won[keep] | (label_ids[keep] >= classes)]
        elif extra:
            keep = keep[~won[keep] & (label_ids[keep] < classes)]
        keep = keep[: scoring.max_detections]
        return boxes[keep], scores[keep].astype(F32), label_ids[keep].astype(np.int64)

    # ----------------------------------------------------------------------------- entry points
    def predict(self, pixels: np.ndarray, labels: Sequence[str] | None = None, *, text_embeddings=None,
                original_size: tuple[int, int] | None = None, rules=None,
                **scoring) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One HxWx3 uint8 RGB image -> ``(boxes_xyxy (K, 4), scores (K,), label_ids (K,))`` numpy
        arrays, boxes in pixels of the image (of ``original_size`` (h, w) when ``pixels`` is a
        reduced copy). Scoring keywords as ``detect``; ``rules`` for a compiled vocabulary's
        ``text_embeddings`` (classes, then negatives; ``Predictor.compile``). Never imports torch."""
        pixels = _reduce(_check_pixels(pixels), self.input_max_side)
        cfg = self.scoring_config(**scoring)
        labels, text = self.vocabulary(labels, text_embeddings)
        image = np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(F32) / F32(255)
        boxes, objectness = self.propose(image)
        regions, deltas = self.embed_with_deltas(image, boxes)
        if deltas is not None:
            # As RegionCLIP.detect_batch: the boxes move, their scores stay those of the proposals'
            # embeddings (no second embedding of the moved boxes) and objectness.
            boxes = self.refine(boxes, deltas, image.shape[1:])
        probs = self.probabilities(regions, text)
        boxes, scores, ids = self.postprocess(boxes, objectness, probs, cfg, rules)
        oh, ow = original_size or pixels.shape[:2]
        h, w = pixels.shape[:2]
        if (oh, ow) != (h, w):
            sx, sy = ow / w, oh / h
            boxes = boxes * np.array([sx, sy, sx, sy], dtype=F32)
        return boxes, scores, ids

    # ----------------------------------------------------------------- the predictor backend
    def detect_chunk(self, loaded: Sequence, labels: Sequence[str], text: np.ndarray, scoring: ScoringConfig,
                     boxes=None, proposals: bool = False, batch_size: int | None = None, rules=None) -> list:
        """``Predictor``'s backend call: per decoded image (``LoadedImage``), ``(Detections, None)``.
        Images run one at a time (``batch_size`` is for the torch backend); given boxes and
        proposal outputs are not supported."""
        import torch

        from ..detections import Detections
        from ..scoring import EXTRA_NAME

        if boxes is not None or proposals:
            raise BadInput("the ONNX runtime detects with its own proposals only; classify given boxes with "
                           "RegionCLIP.from_pretrained(...).detect(images, labels, boxes)")
        out = []
        for x in loaded:
            names = list(labels) + [f"extra {i}" for i in range(rules.extra if rules else 0)]
            b, s, ids = self.predict(x.pixels, names, text_embeddings=text, original_size=x.original_size,
                                     rules=rules, **dataclasses.asdict(scoring))
            named = (*labels, *[EXTRA_NAME] * (rules.extra if rules else 0)) if scoring.report_extra else tuple(labels)
            out.append((Detections(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(ids), named), None))
        return out

    def classify_chunk(self, *args, **kwargs):
        raise BadInput("the ONNX runtime does not classify given boxes; use RegionCLIP.from_pretrained(...).classify")


def _providers(ort, device: str | None) -> list[str]:
    device = (device or "cpu").strip().lower()
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise BadInput(f"device '{device}' needs onnxruntime's CUDA provider (the onnxruntime-gpu package); "
                           f"this onnxruntime has {', '.join(available)}: use device 'cpu'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BadInput(f"unknown device '{device}' for onnxruntime: use auto, cpu or cuda")


def _mask_padding(logits: np.ndarray, anchors: np.ndarray, size: tuple[int, int], divisor: int) -> np.ndarray:
    """``ProposalStage._mask_padding`` for one image: anchors centred beyond the image's own padded
    size get -inf (none when the image is alone in its batch, as here; kept for the same code)."""
    d = max(1, int(divisor))
    h, w = -(-size[0] // d) * d, -(-size[1] // d) * d
    cx = (anchors[:, 0] + anchors[:, 2]) / F32(2)
    cy = (anchors[:, 1] + anchors[:, 3]) / F32(2)
    return np.where((cx >= w) | (cy >= h), F32(-np.inf), logits).astype(F32)


# A torch-free copy of regionclip.io.reduce (regionclip.io imports torch).
def _reduce(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = pixels.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return pixels
    scale = max_side / max(h, w)
    return cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _check_pixels(pixels) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise BadInput(f"predict takes an HxWx3 uint8 RGB array, but got {arr.dtype} {arr.shape}; "
                       "detect takes paths, PIL images and other arrays")
    return arr


def _read_embeddings(source) -> np.ndarray:
    """(L, D) unit rows from an array / tensor / .npy file, or a RegionCLIP concept file via torch."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise BadInput(f"text embeddings file not found: {path}")
        if path.suffix == ".npy":
            emb = np.load(path, allow_pickle=False)
        else:
            from ..vocabulary import load_concept_embeddings

            emb = load_concept_embeddings(path).numpy()
    else:
        emb = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source)
    emb = np.atleast_2d(emb).astype(F32)
    if emb.ndim != 2 or 0 in emb.shape or not np.isfinite(emb).all():
        raise BadInput(f"text embeddings must be a finite (L, D) array, but got shape {emb.shape}")
    return ops.l2_normalize(emb)
