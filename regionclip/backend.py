"""``TorchBackend``: a ``RegionCLIPModel`` behind the predictor, one chunk of decoded images at a time.

The predictor (``predictor.Predictor``) decodes and streams; a backend turns a chunk of decoded
images into ``Detections`` (or probability matrices). This one pads images of similar aspect
into ``ImageBatch``es, runs the model's stages and postprocesses (scores, selection, NMS) on the
device. The other backend is the ONNX runtime (``onnx.runtime.OnnxDetector``), with the same
``scoring_config`` / ``vocabulary`` / ``detect_chunk`` methods.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from .batch import ImageBatch, aspect_groups
from .config import ScoringConfig, check_scoring
from .detections import Detections
from .errors import BadInput
from .io import LoadedImage
from .labels import check_labels
from .scoring import probabilities, regionclip_scores, select, select_pairs
from .vocabulary import check_concept_embeddings, load_concept_embeddings


class TorchBackend:
    """Runs ``model`` (a ``RegionCLIPModel``) over chunks of decoded images."""

    def __init__(self, model) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def input_max_side(self) -> int | None:
        return self.model.input_max_side

    def scoring_config(self, **overrides) -> ScoringConfig:
        """The model's scoring with the non-None ``overrides`` applied, checked."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            cfg = dataclasses.replace(self.model.cfg.scoring, **given)
        except TypeError as exc:
            raise BadInput(f"unknown scoring option: {exc}") from None
        return check_scoring(cfg)

    def encode_text(self, labels: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(labels)

    def vocabulary(self, labels: Sequence[str] | None, text_embeddings=None) -> tuple[list[str], torch.Tensor]:
        """``(labels, (L, D) unit-norm embeddings)``: ``labels`` encoded by the text tower, or, with
        ``text_embeddings`` (an (L, D) tensor or a RegionCLIP concept-embedding file such as
        ``coco_65_cls_emb.pth``), those rows, one per label in order (``labels`` None: named "0", "1", ...).
        A count or dimension that does not fit raises ``BadInput`` naming both."""
        if text_embeddings is None:
            if labels is None:
                raise BadInput("pass labels (a list of names) or text_embeddings (a tensor or concept-embedding file)")
            labels = check_labels(labels)
            return labels, self.encode_text(labels)
        emb = load_concept_embeddings(text_embeddings)
        labels = check_labels(labels) if labels is not None else [str(i) for i in range(len(emb))]
        where = "text embeddings" if isinstance(text_embeddings, torch.Tensor) else f"text embeddings {text_embeddings}"
        return labels, check_concept_embeddings(emb, labels, self.model.regions.embed_dim(), where).to(self.device)

    @torch.inference_mode()
    def embed_exemplars(self, image, boxes_xyxy) -> torch.Tensor:
        """(N, D) unit-norm region embeddings of ``boxes_xyxy`` (N, 4, original pixels) in ``image``
        (any ``io.ImageSource``): the model's ``embed``, as detections' regions are embedded."""
        return self.embed_exemplar_images([(image, boxes_xyxy)])[0]

    @torch.inference_mode()
    def embed_exemplar_images(self, items: Sequence, batch_size: int = 8) -> list[torch.Tensor]:
        """``embed_exemplars`` of many ``(image, boxes_xyxy)`` at once, in batches of images of one
        size: no padding, so an exemplar's embedding never depends on the images beside it (the
        cache keys it by its own image and box). One (Ni, D) tensor per item."""
        from .io import load_reduced

        loaded = [load_reduced(image, self.input_max_side) for image, _ in items]
        out: list = [None] * len(items)
        m = self.model
        same: dict = {}
        for i, x in enumerate(loaded):
            same.setdefault(x.pixels.shape[:2], []).append(i)
        for idx in [g[k:k + batch_size] for g in same.values() for k in range(0, len(g), batch_size)]:
            batch = self.batch([loaded[i] for i in idx])
            boxes = [batch.to_batch(j, self.check_boxes(items[i][1])) for j, i in enumerate(idx)]
            with m.autocast():
                emb = m.embed(batch, boxes).float()
            for i, e in zip(idx, emb.split([len(b) for b in boxes])):
                out[i] = e
        return out

    def check_boxes(self, boxes) -> torch.Tensor:
        """(N, 4) xyxy boxes (array, list or tensor) -> float tensor on the device; ``BadInput`` otherwise."""
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float32) if not isinstance(boxes, torch.Tensor) else boxes)
        if t.ndim != 2 or t.shape[1] != 4:
            raise BadInput(f"boxes must have shape (N, 4) as x1, y1, x2, y2, but got {tuple(t.shape)}")
        if len(t) and bool(((t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])).any()):
            raise BadInput("boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1")
        return t.float().to(self.device)

    def batch(self, loaded: Sequence[LoadedImage]) -> ImageBatch:
        """The one place where inputs move to the device."""
        return ImageBatch.from_loaded(loaded, self.device)

    # ----------------------------------------------------------------------------- one batch
    def postprocess(self, batch: ImageBatch, boxes: Sequence[torch.Tensor], objectness: Sequence[torch.Tensor | None],
                    logits: torch.Tensor, labels: Sequence[str], scoring: ScoringConfig | None = None,
                    filter_boxes: bool = True, rules=None) -> list[Detections]:
        """Scores, selection and NMS per image; boxes back in original-image pixels.
        ``filter_boxes=False`` keeps every box with its top-k labels (given boxes).

        ``scoring.recipe`` default: probabilities fused with objectness, top-k labels per box,
        threshold, NMS (``scoring.probabilities`` + ``select``). regionclip: RegionCLIP's inference,
        ``scoring.regionclip_scores`` (times the raw RPN logit when ``objectness`` holds logits, see
        ``RegionCLIPModel.propose``) + ``scoring.select_pairs``. ``rules`` (``exemplars.VocabRules``):
        ``logits`` hold negative columns after the ``labels``; per-class thresholds."""
        cfg = scoring or self.model.cfg.scoring
        columns = len(labels) + (rules.extra if rules is not None else 0)
        out = []
        for i, (b, o, lg) in enumerate(zip(boxes, objectness, logits.split([len(b) for b in boxes]))):
            if cfg.recipe == "regionclip":
                fuse = o if (o is not None and self.model.wants_logits(cfg)) else None
                probs = regionclip_scores(lg.float().softmax(dim=-1), fuse)
                d = (select_pairs(b, probs, cfg, labels, rules) if filter_boxes
                     else select(b, probs, cfg, labels, False, rules))
            else:
                d = select(b, probabilities(lg, columns, o, cfg), cfg, labels, filter_boxes, rules)
            out.append(dataclasses.replace(d, boxes_xyxy=batch.to_original(i, d.boxes_xyxy)))
        return out

    def detect_batch(self, batch: ImageBatch, text_emb: torch.Tensor, labels: Sequence[str],
                     scoring: ScoringConfig | None = None, boxes: Sequence[torch.Tensor] | None = None,
                     proposals_out: list | None = None, rules=None) -> list[Detections]:
        """The stages over one batch; ``boxes`` (batch pixels) replace the proposals and are
        never refined. ``proposals_out`` (a list) receives each image's proposals as
        ``(boxes_xyxy in original pixels, objectness)``, what ``regionclip.recall`` measures."""
        m = self.model
        scoring = scoring or m.cfg.scoring
        given = boxes is not None
        with m.autocast():
            boxes, objectness, regions = self._regions(batch, scoring, boxes, proposals_out)
            logits = m.logits(regions, text_emb, background=scoring.background)
        return self.postprocess(batch, boxes, objectness, logits, labels, scoring, filter_boxes=not given, rules=rules)

    def _regions(self, batch: ImageBatch, scoring: ScoringConfig, boxes=None, proposals_out: list | None = None):
        """``(boxes, objectness, region features)`` of one batch: the proposals (or the given
        ``boxes``, never refined), their embeddings, the boxes moved by the box head where it refines."""
        m = self.model
        given = boxes is not None
        refine = m.refines_boxes and not given
        if given:
            objectness = [None] * len(boxes)
        else:
            boxes, objectness = m.propose(batch, logits=m.wants_logits(scoring))
            if proposals_out is not None:
                proposals_out += [(batch.to_original(i, b), o) for i, (b, o) in enumerate(zip(boxes, objectness))]
        regions = m.embed(batch, boxes, raw=refine)
        if refine:
            boxes = m.refine(batch, boxes, regions)
        return boxes, objectness, regions

    def detect_runs(self, loaded: Sequence[LoadedImage], runs: Sequence, batch_size: int | None = None) -> list[list]:
        """Per image of ``loaded``, one ``Detections`` per run ``(labels, text_emb, scoring, rules)``:
        proposals and region embeddings computed once, then each run's logits and selection (the
        runs differ in vocabulary and selection settings, e.g. short-list evaluation's lists). The
        runs share the proposal stage's objectness kind (``RegionCLIPModel.wants_logits``) of the first."""
        m = self.model
        out: list = [None] * len(loaded)
        for idx in aspect_groups([x.pixels.shape[:2] for x in loaded], batch_size or len(loaded)):
            batch = self.batch([loaded[i] for i in idx])
            with m.autocast():
                boxes, objectness, regions = self._regions(batch, runs[0][2])
                per_run = [self.postprocess(batch, boxes, objectness,
                                            m.logits(regions, emb, background=cfg.background), labels, cfg, rules=rules)
                           for labels, emb, cfg, rules in runs]
            for k, i in enumerate(idx):
                out[i] = [dets[k] for dets in per_run]
        return out

    # ----------------------------------------------------------------------------- one chunk
    def detect_chunk(self, loaded: Sequence[LoadedImage], labels: Sequence[str], text_emb: torch.Tensor,
                     scoring: ScoringConfig, boxes: Sequence[torch.Tensor] | None = None,
                     proposals: bool = False, batch_size: int | None = None,
                     rules=None) -> list[tuple[Detections, tuple | None]]:
        """Per image of ``loaded``, in order: its ``Detections`` and, with ``proposals``, its
        ``(boxes_xyxy, objectness)`` proposals in original pixels. ``boxes`` (original pixels, on
        the device) replace the proposals. Batches of at most ``batch_size`` (default: all), portrait
        and landscape apart, similar aspect ratios together (``batch.aspect_groups``)."""
        out: list = [None] * len(loaded)
        for idx in aspect_groups([x.pixels.shape[:2] for x in loaded], batch_size or len(loaded)):
            batch = self.batch([loaded[i] for i in idx])
            given = [batch.to_batch(j, boxes[i]) for j, i in enumerate(idx)] if boxes is not None else None
            found: list | None = [] if proposals and given is None else None
            dets = self.detect_batch(batch, text_emb, labels, scoring, given, found, rules)
            for k, (i, d) in enumerate(zip(idx, dets)):
                out[i] = (d, found[k] if found else None)
        return out

    def classify_chunk(self, loaded: Sequence[LoadedImage], labels: Sequence[str], text_emb: torch.Tensor,
                       boxes: Sequence[torch.Tensor], batch_size: int | None = None) -> list[torch.Tensor]:
        """Per image, the (N, L) probabilities of its given ``boxes`` (original pixels, on the
        device) over ``labels``: no objectness, no filtering."""
        m = self.model
        out: list = [None] * len(loaded)
        for idx in aspect_groups([x.pixels.shape[:2] for x in loaded], batch_size or len(loaded)):
            batch = self.batch([loaded[i] for i in idx])
            given = [batch.to_batch(j, boxes[i]) for j, i in enumerate(idx)]
            with m.autocast():
                logits = m.logits(m.embed(batch, given), text_emb)
            probs = probabilities(logits, len(labels), None, m.cfg.scoring)
            for i, p in zip(idx, probs.split([len(b) for b in given])):
                out[i] = p
        return out
