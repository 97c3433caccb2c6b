"""``RegionCLIP``: the model and its predictor behind one name.

``RegionCLIP`` is a ``RegionCLIPModel`` (``model.py``: the stages, ``save``/``load``) whose
inference methods go to a ``Predictor`` over it (``predictor.py``: decoding, streaming,
batching, the vocabulary; ``backend.py``: postprocessing on the device). It is what the README
shows and what training holds; new code can use either half on its own. ``from_onnx`` gives
the same ``Predictor`` over the ONNX runtime.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import torch

from .backend import TorchBackend
from .batch import ImageBatch
from .config import ScoringConfig
from .detections import Detections
from .io import ImageSource, LoadedImage, load_reduced
from .model import RegionCLIPModel, resolve_model_config  # noqa: F401 (resolve_model_config re-exported)
from .predictor import Prediction, Predictor
from .scoring import score_regions  # noqa: F401 (re-exported)


class RegionCLIP(RegionCLIPModel):
    """Open-vocabulary detector: Faster R-CNN proposals, CLIP region embeddings, text matching.

    Build it from arguments (``RegionCLIP(clip_model="RN50", mode="pool")``), from a
    ``ModelConfig``, or by preset name / YAML path with ``from_pretrained``.
    """

    @property
    def predictor(self) -> Predictor:
        """The predictor over this model (made on first use; ``num_workers`` 0)."""
        pred = self.__dict__.get("_predictor")
        if pred is None:
            pred = self.__dict__["_predictor"] = Predictor(TorchBackend(self))
        return pred

    @classmethod
    def from_onnx(cls, folder: str | os.PathLike, **kwargs) -> Predictor:
        """An ONNX export (``regionclip export``, ``regionclip.onnx.export_onnx``) run with
        onnxruntime: a ``Predictor`` with the ONNX backend (``detect``, ``stream``,
        ``encode_text``; the export's numpy ``predict`` too). Keywords go to
        ``regionclip.onnx.OnnxDetector`` (``device``, ``threads``, ``verify``)."""
        return Predictor.from_onnx(folder, **kwargs)

    # ------------------------------------------------------------ the predictor's, by name
    def scoring_config(self, **overrides) -> ScoringConfig:
        """The model's scoring with the non-None ``overrides`` applied, checked."""
        return self.predictor.scoring_config(**overrides)

    def vocabulary(self, labels: Sequence[str] | None, text_embeddings=None) -> tuple[list[str], torch.Tensor]:
        """``(labels, (L, D) unit-norm embeddings)`` (``TorchBackend.vocabulary``)."""
        return self.predictor.vocabulary(labels, text_embeddings)

    def load(self, images: Sequence[ImageSource]) -> list[LoadedImage]:
        """Decode images at the resolution the stages need (see ``input_max_side``)."""
        return [load_reduced(img, self.input_max_side) for img in images]

    def batch(self, loaded: Sequence[LoadedImage]) -> ImageBatch:
        """Decoded images -> one padded batch on the model's device."""
        return self.predictor.backend.batch(loaded)

    def postprocess(self, batch: ImageBatch, boxes: Sequence[torch.Tensor], objectness: Sequence[torch.Tensor | None],
                    logits: torch.Tensor, labels: Sequence[str], scoring: ScoringConfig | None = None,
                    filter_boxes: bool = True) -> list[Detections]:
        """Stage 4: scores, selection and NMS per image; boxes in original-image pixels
        (``TorchBackend.postprocess``)."""
        return self.predictor.backend.postprocess(batch, boxes, objectness, logits, labels, scoring, filter_boxes)

    def detect_batch(self, batch: ImageBatch, text_emb: torch.Tensor, labels: Sequence[str],
                     scoring: ScoringConfig | None = None, boxes: Sequence[torch.Tensor] | None = None,
                     proposals_out: list | None = None) -> list[Detections]:
        """The stages over one batch (``TorchBackend.detect_batch``)."""
        return self.predictor.backend.detect_batch(batch, text_emb, labels, scoring, boxes, proposals_out)

    @torch.inference_mode()
    def encode_regions(self, image: ImageSource, boxes_xyxy) -> torch.Tensor:
        """(N, D) unit-norm embeddings of ``boxes_xyxy`` (N, 4) in pixels of ``image``."""
        batch = self.batch(self.load([image]))
        boxes = batch.to_batch(0, self.predictor.backend.check_boxes(boxes_xyxy))
        with self.autocast():
            return self.embed(batch, [boxes])

    def classify(self, images: Sequence[ImageSource], labels: Sequence[str] | None, boxes: Sequence,
                 batch_size: int = 8, *, text_embeddings=None, vocab=None, exemplars=()) -> list[torch.Tensor]:
        """Per image, the (N, L) probability matrix of its given ``boxes`` (N, 4 xyxy, original
        pixels) over ``labels`` (or the classes of ``vocab`` / ``exemplars``, see ``detect``): the
        GT-box protocol's input. No objectness, no filtering.

        Rows do not sum to 1 when the model scores a background column (``scoring.background``,
        the demo's), the vocabulary has negatives or distractors apply (``regionclip.distractors``):
        the softmax runs over those too and they are dropped, so ``1 - row.sum()`` is their share
        (a box that is nothing listed)."""
        return self.predictor.classify(images, labels, boxes, batch_size, text_embeddings=text_embeddings,
                                       vocab=vocab, exemplars=exemplars)

    def stream(self, sources: Iterable, labels: Sequence[str] | None = None, **kwargs) -> Iterator[Prediction]:
        """``Predictor.stream``: a ``Prediction`` per source, in order, decoded a chunk ahead."""
        return self.predictor.stream(sources, labels, **kwargs)

    def detect(
        self,
        images: ImageSource | Sequence[ImageSource],
        labels: Sequence[str] | None = None,
        boxes=None,
        *,
        text_embeddings=None,
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        top_k: int | None = None,
        agnostic_nms: bool | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        proposals_out: list | None = None,
        vocab=None,
        exemplars=(),
        distractors=None,
        tile: int | None = None,
        tile_overlap: float | None = None,
    ) -> Detections | list[Detections]:
        """Detect ``labels`` in one image (returns ``Detections``) or a list (returns a list).

        Images: paths, PIL images, HxWx3 RGB arrays or tensors, decoded ``batch_size`` at a time
        (``num_workers`` DataLoader processes ahead); images of any sizes share a padded batch
        (similar aspect ratios together). ``boxes`` (N, 4 xyxy pixels, or a list of them for a
        list of images) skips the proposal stage: each given box is classified and returned with
        its top-k labels, in input order, unfiltered. ``agnostic_nms``: suppress overlapping
        boxes across labels too (one box per object). ``text_embeddings`` (a tensor or a
        concept-embedding file, one row per label) replaces encoding ``labels`` (see
        ``vocabulary``). ``proposals_out`` (a list) receives each image's proposals, in input
        order, as ``detect_batch`` gives them. For many inputs, ``stream`` yields as it goes.
        ``vocab`` (a ``Vocabulary``, YAML path or dict; ``labels`` may be a ``Vocabulary``) gives
        classes with prompts, exemplars, negatives and thresholds; ``exemplars`` adds examples,
        ``{name: [(image, (x1, y1, x2, y2)) or a (D,) embedding, ...]}`` or
        ``["NAME=IMAGE:x1,y1,x2,y2", ...]`` (docs/vocabulary.md). ``distractors``: names scored
        beside the labels and never reported, so an unlisted object is not given a listed name
        (``"default"``: the model's own, ``"none"``, ``"common"``, a file or a list; ``Predictor.stream``).
        ``tile`` (pixels, e.g. 320) and ``tile_overlap`` (default 0.2): small objects in images larger
        than a tile, detected by overlapping windows plus one whole-image pass, merged
        (``regionclip.tiles``; docs/detect.md). An image no larger than a tile runs as without.
        """
        return self.predictor.detect(images, labels, boxes, text_embeddings=text_embeddings,
                                     score_threshold=score_threshold, nms_iou=nms_iou,
                                     max_detections=max_detections, top_k=top_k, agnostic_nms=agnostic_nms,
                                     batch_size=batch_size, num_workers=num_workers, proposals_out=proposals_out,
                                     vocab=vocab, exemplars=exemplars, distractors=distractors,
                                     tile=tile, tile_overlap=tile_overlap)
