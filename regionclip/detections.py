"""``Detections``: the one result type that flows out of every stage of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .doubt import Doubt
from .errors import BadInput


@dataclass(frozen=True)
class Detections:
    """Labelled boxes for one image.

    Attributes:
        boxes_xyxy: (N, 4) float tensor, ``x1, y1, x2, y2`` in pixels of the ORIGINAL image.
        scores: (N,) float tensor in [0, 1].
        label_ids: (N,) int64 tensor of indices into ``vocabulary``.
        vocabulary: the label strings the ids refer to (the labels passed to ``detect``).
        doubt: how sure the selection was of each detection (``regionclip.doubt``), or None where
            it is not known (given boxes, the ONNX runtime, detections made by hand).

    Tensors stay on the device they were computed on; ``cpu()`` moves them.
    """

    boxes_xyxy: torch.Tensor
    scores: torch.Tensor
    label_ids: torch.Tensor
    vocabulary: tuple[str, ...] = ()
    doubt: Doubt | None = None

    def __post_init__(self) -> None:
        b, s, l = self.boxes_xyxy, self.scores, self.label_ids
        if b.ndim != 2 or b.shape[1] != 4:
            raise BadInput(f"boxes_xyxy must have shape (N, 4), but got {tuple(b.shape)}")
        n = b.shape[0]
        if s.shape != (n,):
            raise BadInput(f"scores must have shape ({n},), but got {tuple(s.shape)}")
        if l.shape != (n,):
            raise BadInput(f"label_ids must have shape ({n},), but got {tuple(l.shape)}")
        if l.dtype != torch.int64:
            raise BadInput(f"label_ids must be int64, but got {l.dtype}")
        # Range-checked on the CPU only: on a GPU the check would wait for the device (a host
        # sync per image), and ids made by ``topk`` over the vocabulary are in range anyway.
        if n and self.vocabulary and l.device.type == "cpu" and int(l.max()) >= len(self.vocabulary):
            raise BadInput(
                f"label id {int(l.max())} is out of range for a vocabulary of {len(self.vocabulary)}"
            )
        if self.doubt is not None and self.doubt.margins.shape != (n,):
            raise BadInput(f"doubt must hold ({n},) figures, but got {tuple(self.doubt.margins.shape)}")
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))

    @classmethod
    def empty(cls, vocabulary: Sequence[str] = (), device: torch.device | str = "cpu") -> Detections:
        return cls(
            boxes_xyxy=torch.zeros((0, 4), device=device),
            scores=torch.zeros((0,), device=device),
            label_ids=torch.zeros((0,), dtype=torch.int64, device=device),
            vocabulary=tuple(vocabulary),
        )

    def __len__(self) -> int:
        return int(self.boxes_xyxy.shape[0])

    def __getitem__(self, index: int | slice | torch.Tensor | Sequence[int]) -> Detections:
        """Select detections by int, slice, index list/tensor or boolean mask; always a ``Detections``."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, device=self.scores.device)
            if index.dtype == torch.bool and index.shape != self.scores.shape:
                raise BadInput(f"mask must have shape ({len(self)},), but got {tuple(index.shape)}")
        return Detections(
            self.boxes_xyxy[index], self.scores[index], self.label_ids[index], self.vocabulary,
            None if self.doubt is None else self.doubt[index],
        )

    @property
    def names(self) -> list[str]:
        """The label string of each detection."""
        return [self.vocabulary[i] for i in self.label_ids.tolist()]

    def cpu(self) -> Detections:
        return Detections(
            self.boxes_xyxy.cpu(), self.scores.cpu(), self.label_ids.cpu(), self.vocabulary,
            None if self.doubt is None else self.doubt.cpu(),
        )

    def to_records(
        self,
        image: str | None = None,
        image_id: int | None = None,
        category_ids: Mapping[str, int] | None = None,
    ) -> list[dict]:
        """COCO results records, one per detection, that pycocotools' ``loadRes`` accepts.

        Each record holds ``bbox`` as ``[x, y, w, h]`` in original-image pixels, ``score``,
        ``category_id`` and ``label`` (the name), plus ``image_id`` and ``image`` (a file
        name) when given.

        ``category_id`` is ``category_ids[label]`` when a mapping is given (the ground truth's
        COCO ids; detections whose label it lacks are LEFT OUT, since they cannot be scored),
        else the 1-based position in the vocabulary (COCO ids start at 1; ``label_ids + 1``).
        """
        records = []
        boxes = self.boxes_xyxy.detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for bbox, score, label_id in zip(xywh, self.scores.tolist(), self.label_ids.tolist()):
            name = self.vocabulary[label_id] if self.vocabulary else str(label_id)
            if category_ids is not None and name not in category_ids:
                continue
            record = {
                "bbox": [round(v, 2) for v in bbox],
                "score": round(float(score), 5),
                "category_id": int(category_ids[name]) if category_ids is not None else label_id + 1,
                "label": name,
            }
            if image_id is not None:
                record["image_id"] = int(image_id)
            if image is not None:
                record["image"] = image
            records.append(record)
        return records
