"""``CocoDetection``: a COCO annotation file + image folder as torchvision-style training samples."""

from __future__ import annotations

import contextlib
import difflib
import io as _io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..errors import BadAnnotations, BadConfig, BadInput
from ..io import load_image

Target = dict[str, Any]
# torchvision.transforms.v2 moves the boxes with the pixels. Boxes are clamped to the image
# first; boxes under a pixel wide or high after the geometric steps are dropped with their labels.
_CLAMP = v2.ClampBoundingBoxes()
_SANITIZE = v2.SanitizeBoundingBoxes(min_size=1.0)


def read_json(path: Path, missing: str, kind: str) -> Any:
    """A JSON annotation file's contents; ``BadAnnotations`` saying ``missing`` (what to pass
    instead) when there is no such file, or that it is no JSON ``kind`` file."""
    if not path.is_file():
        raise BadAnnotations(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadAnnotations(f"{path}: not valid JSON ({exc}); expected a {kind} file") from None


def _read_coco(path: Path) -> COCO:
    """Validate and index a COCO instances file without pycocotools' prints."""
    data = read_json(path, "annotation file not found; pass a COCO instances_*.json "
                     "(`regionclip make-shapes DIR` writes a small one)", "COCO instances")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise BadAnnotations(
            f"{path}: not a COCO instances file: missing list(s) {missing}; "
            "expected a JSON object with 'images', 'annotations' and 'categories'"
        )
    for kind, keys in (("images", ("id", "file_name")), ("categories", ("id", "name")),
                       ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for entry in data[kind]:
            if not isinstance(entry, dict) or any(k not in entry for k in keys):
                raise BadAnnotations(f"{path}: an entry in '{kind}' lacks one of {list(keys)}: {str(entry)[:120]}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(_io.StringIO()):  # createIndex prints; the library never does
        coco.createIndex()
    return coco


# The label of a hard-negative box (``CocoDetection(negatives=...)``): none of the categories.
NEGATIVE = -1


class CocoDetection(Dataset):
    """Images and boxes of a COCO instances file, optionally restricted to some categories.

    ``dataset[i]`` is ``(image, target)``:

    - ``image``: uint8 ``(3, H, W)`` RGB (EXIF orientation applied), resized so the longer side
      is at most ``max_side`` when given. uint8 because loaders send it to the device a quarter
      the bytes of float32; ``to_float`` makes the model's [0, 1] floats there.
    - ``target``: ``{"boxes": (N, 4) float32 xyxy in pixels of the RETURNED image,
      "labels": (N,) int64 indices into ``category_names`` (``NEGATIVE`` for a hard negative), "image_id": int,
      "orig_size": (H, W) of the file, "dropped": boxes lost to the transforms}``. An image
      without kept boxes gives ``boxes`` (0, 4).

    Crowd annotations and boxes under 1 px wide or high are skipped, in the file and again after
    clipping to the image and resizing (``dropped`` counts the latter); every image is kept, so
    negatives (no boxes) train the detector to stay quiet. With ``train=True`` images are
    flipped horizontally with probability ``hflip_prob``: drawn from torch's RNG for
    ``dataset[i]``; for ``dataset[(i, seed)]`` (what training's batch sampler yields) from that
    seed alone, so a sample's augmentation depends on neither the worker that loads it nor a resume.

    Args:
        annotations: COCO instances JSON path.
        images_dir: folder the images' ``file_name`` entries are relative to.
        categories: names to keep, in label order (e.g. a split's ``base`` list); annotations of
            other categories are dropped. ``None`` keeps every category, ordered by COCO id.
        negatives: categories whose boxes are kept as hard negatives, things that are none of
            ``categories``: labelled ``NEGATIVE`` (-1), which training learns as background.
    """

    def __init__(
        self,
        annotations: str | Path,
        images_dir: str | Path,
        categories: Sequence[str] | None = None,
        train: bool = False,
        max_side: int | None = None,
        hflip_prob: float = 0.5,
        negatives: Sequence[str] = (),
    ) -> None:
        if max_side is not None and max_side < 1:
            raise BadInput(f"max_side must be a positive number of pixels or None, but got {max_side}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise BadInput(f"hflip_prob must be in [0, 1], but got {hflip_prob}")
        self.annotations_path = Path(annotations)
        self.images_dir = Path(images_dir)
        self.train = train
        self.max_side = max_side
        self.hflip_prob = hflip_prob
        self._coco = _read_coco(self.annotations_path)

        cats = sorted(self._coco.dataset["categories"], key=lambda c: c["id"])
        id_by_name = {c["name"]: c["id"] for c in cats}
        if categories is None:
            names = [c["name"] for c in cats]
        else:
            names = list(dict.fromkeys(categories))
            for name in names:
                if name not in id_by_name:
                    close = difflib.get_close_matches(name, list(id_by_name), n=1)
                    hint = f"did you mean '{close[0]}'?" if close else f"known: {sorted(id_by_name)[:20]}"
                    raise BadConfig(f"category '{name}' is not in {self.annotations_path}; {hint}")
        for name in negatives:
            if name not in id_by_name:
                raise BadConfig(f"negative category '{name}' is not in {self.annotations_path}; "
                                f"known: {sorted(id_by_name)[:20]}")
            if name in names:
                raise BadConfig(f"'{name}' is both a category and a negative category")
        self._names = names
        label_by_cat_id = {id_by_name[n]: k for k, n in enumerate(names)}
        label_by_cat_id.update({id_by_name[n]: NEGATIVE for n in negatives})

        # Parsed once: per image (id, file name, boxes xyxy, labels) in image-id order.
        self._records: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        for image_id in sorted(self._coco.imgs):
            boxes, labels = [], []
            for ann in self._coco.imgToAnns.get(image_id, []):
                label = label_by_cat_id.get(ann["category_id"])
                if label is None or ann.get("iscrowd", 0):
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                if w < 1 or h < 1:
                    continue
                boxes.append([x, y, x + w, y + h])
                labels.append(label)
            self._records.append((
                image_id,
                self._coco.imgs[image_id]["file_name"],
                np.asarray(boxes, np.float32).reshape(-1, 4),
                np.asarray(labels, np.int64),
            ))

    @property
    def category_names(self) -> list[str]:
        """Label index -> category name (contiguous 0..C-1; not COCO ids)."""
        return list(self._names)

    @property
    def coco(self) -> COCO:
        """The pycocotools index of the whole file (all categories), e.g. for ``COCOeval``."""
        return self._coco

    @property
    def ids(self) -> list[int]:
        """COCO image ids, in sample order."""
        return [r[0] for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_id, file_name, boxes_np, labels_np = self._records[index]
        # BadImage names the file. HWC -> CHW, still uint8.
        image = torch.from_numpy(load_image(self.images_dir / file_name)).permute(2, 0, 1).contiguous()
        h, w = image.shape[-2:]
        sample = {"image": tv_tensors.Image(image), "labels": torch.from_numpy(labels_np.copy()),
                  "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes_np.copy()), format="XYXY", canvas_size=(h, w))}
        sample = _CLAMP(sample)
        if self.max_side is not None and max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
            # antialias: plain bilinear downsampling aliases thin edges that small boxes depend on.
            sample = v2.Resize([max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)(sample)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        if self.train and self.hflip_prob > 0 and torch.rand((), generator=generator) < self.hflip_prob:
            # v2's functional, with our own coin: v2.RandomHorizontalFlip draws from the global RNG
            # even at p=1, which would tie the step's sampling to where the batch was decoded.
            sample = {**sample, "image": TF.horizontal_flip(sample["image"]), "boxes": TF.horizontal_flip(sample["boxes"])}
        n_boxes = len(sample["boxes"])
        # After every geometric step: a box that clipping or resizing left under a pixel wide
        # (real COCO has boxes partly or wholly outside their image) would make the box
        # regression targets infinite. Counted, so a run's log says what it lost.
        sample = _SANITIZE(sample)
        image = sample["image"].as_subclass(torch.Tensor)
        target: Target = {"boxes": sample["boxes"].as_subclass(torch.Tensor), "labels": sample["labels"],
                          "image_id": int(image_id), "orig_size": (int(h), int(w)),
                          "dropped": n_boxes - len(sample["boxes"])}
        return image, target

    @staticmethod
    def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
        return collate(batch)


def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """DataLoader ``collate_fn``: images differ in size, so keep per-image lists, not a stack."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def to_float(images: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """uint8 ``(3, H, W)`` images (pinned, when a loader pinned them) -> float32 in [0, 1] on
    ``device``: the bytes cross as uint8 without blocking the host, the conversion runs there."""
    return [img.to(device, non_blocking=True).float().div_(255.0) for img in images]
