"""detectron2's R50-FPN / R50-C4 RPN as a torchvision Faster R-CNN proposal stage.

The architecture RegionCLIP's proposal detectors need at load time (``build.load_checkpoint``);
converting their files is the importer's (``zoo/rpn.py``). What differs from torchvision:
builds the torchvision model and ``apply_detectron2_convention`` patches what differs:

* stride 2 in the 1x1 conv of each stage's first block (``RESNETS.STRIDE_IN_1X1``), not the 3x3;
* input BGR in 0-255 minus the caffe mean (103.530, 116.280, 123.675), std 1: the converted
  first conv takes RGB channels, and the transform's mean/std make RGB [0, 1] input equal it;
* the test-time resize ``ResizeShortestEdge(800, 1333)``: ``int(side * scale + 0.5)`` pixels,
  bilinear with antialiasing like PIL's (detectron2 resizes the uint8 image with PIL first);
* anchors unrounded (torchvision rounds cell anchors), ordered size-major, at the nominal
  stride of each level (torchvision derives strides from padded-size // grid, which is 61
  instead of 64 on P6 of an 800-pixel side, and 15 instead of 16 on a C4 map of odd width);
* FrozenBN everywhere (``torchvision.ops.misc.FrozenBatchNorm2d``, eps 1e-5 as detectron2's);
* padding: FPN inputs pad to 32, C4 inputs not at all (detectron2's ResNet has size_divisibility 0).

RPN NMS, pre-/post-NMS top-k stay ``ProposalConfig``'s (``RPN_DEFAULTS`` holds RegionCLIP's).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import BadInput, WeightsUnavailable

CAFFE_MEAN_BGR = (103.530, 116.280, 123.675)  # detectron2 MODEL.PIXEL_MEAN; PIXEL_STD is 1
# Builder names a preset's `detector:` uses for these checkpoints.
DETECTORS = {"detectron2_r50_fpn": "fpn", "detectron2_r50_c4": "c4"}
LAYOUTS = {
    "fpn": dict(sizes=((32,), (64,), (128,), (256,), (512,)), strides=(4, 8, 16, 32, 64), size_divisible=32),
    "c4": dict(sizes=((32, 64, 128, 256, 512),), strides=(16,), size_divisible=1),
}
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# detectron2 test-time RPN settings per layout (Base-RCNN-FPN.yaml / Base-RCNN-C4.yaml); RegionCLIP's
# zero-shot configs raise NMS to 0.9 (MODEL.CLIP.OFFLINE_RPN_NMS_THRESH), see importer.RECIPES.
RPN_DEFAULTS = {
    "fpn": dict(pre_nms_top_n=1000, num_proposals=1000, nms_threshold=0.7, min_size=800, max_size=1333),
    "c4": dict(pre_nms_top_n=6000, num_proposals=1000, nms_threshold=0.7, min_size=800, max_size=1333),
}


def missing_keys_error(path, what: str, missing: list[str]) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"{path}: {what} is missing {len(missing)} weight(s) (e.g. {', '.join(missing[:2])}): "
        "the file is incomplete or of another architecture; download it again"
    )


class Detectron2AnchorGenerator(AnchorGenerator):
    """detectron2's ``DefaultAnchorGenerator`` (offset 0): unrounded cell anchors in size-major
    order (w = sqrt(size^2 / ratio), h = ratio * w), shifted by each level's nominal stride."""

    def __init__(self, sizes, aspect_ratios, strides):
        super().__init__(sizes, aspect_ratios)
        if len(strides) != len(self.sizes):
            raise BadInput(f"{len(strides)} strides for {len(self.sizes)} anchor levels")
        self.strides = tuple(strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        cells = []
        for size in scales:
            for ratio in aspect_ratios:
                w = math.sqrt(float(size) ** 2 / ratio)
                h = ratio * w
                cells.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(cells, dtype=dtype, device=device)

    def with_sizes(self, sizes) -> "Detectron2AnchorGenerator":
        """The same generator with other anchor sizes (``ProposalConfig.anchor_scale``)."""
        return Detectron2AnchorGenerator(sizes, self.aspect_ratios, self.strides)

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(dtype, device)
        levels = []
        for fmap, stride, cell in zip(feature_maps, self.strides, self.cell_anchors):
            gh, gw = fmap.shape[-2:]
            xs = torch.arange(0, gw * stride, step=stride, dtype=torch.float32, device=device)
            ys = torch.arange(0, gh * stride, step=stride, dtype=torch.float32, device=device)
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([sx.reshape(-1), sy.reshape(-1)] * 2, dim=1).to(dtype)
            levels.append((shifts[:, None] + cell[None]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]


class Detectron2Transform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that resizes like detectron2's ``ResizeShortestEdge``."""

    def resize(self, image, target=None):
        h, w = image.shape[-2:]
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        scale = size / min(h, w)
        nh, nw = (size, scale * w) if h < w else (scale * h, size)
        if max(nh, nw) > self.max_size:
            shrink = self.max_size / max(nh, nw)
            nh, nw = nh * shrink, nw * shrink
        nh, nw = int(nh + 0.5), int(nw + 0.5)
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), (nh, nw))
        return image, target


def _freeze_batchnorm(module: nn.Module) -> None:
    """Swap every ``nn.BatchNorm2d`` for a ``FrozenBatchNorm2d`` holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen.to(child.weight.device))
        else:
            _freeze_batchnorm(child)


def apply_detectron2_convention(detector: FasterRCNN, layout: str) -> FasterRCNN:
    """Patch a built torchvision Faster R-CNN (R50-FPN or ``build_rpn_detector``'s C4) in place so
    that a ``convert_rpn`` state dict reproduces detectron2's proposals (see the module docstring).

    Weights already loaded are kept; calling it twice changes nothing more.
    """
    if layout not in LAYOUTS:
        raise BadInput(f"unknown detectron2 RPN layout '{layout}': use fpn or c4")
    spec = LAYOUTS[layout]
    _freeze_batchnorm(detector.backbone)
    body = detector.backbone.body
    for name in ("layer2", "layer3", "layer4"):
        if hasattr(body, name):  # MSRA ResNet: the first block strides in its 1x1 conv
            first = getattr(body, name)[0]
            first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
    old = detector.transform
    detector.transform = Detectron2Transform(
        min_size=old.min_size, max_size=old.max_size,
        image_mean=[m / 255 for m in reversed(CAFFE_MEAN_BGR)], image_std=[1 / 255] * 3,
        size_divisible=spec["size_divisible"],
    )
    rpn = detector.rpn
    rpn.anchor_generator = Detectron2AnchorGenerator(spec["sizes"], (ASPECT_RATIOS,) * len(spec["sizes"]),
                                                     spec["strides"])
    defaults = RPN_DEFAULTS[layout]
    rpn._pre_nms_top_n = {"training": defaults["pre_nms_top_n"], "testing": defaults["pre_nms_top_n"]}
    rpn._post_nms_top_n = {"training": defaults["num_proposals"], "testing": defaults["num_proposals"]}
    rpn.nms_thresh = defaults["nms_threshold"]
    rpn.min_size = 1e-6  # detectron2 keeps every box with positive width and height
    detector.has_box_head = False  # the second stage is random: proposals.source must stay "rpn"
    return detector


class _C4Backbone(nn.Module):
    """ResNet-50 stem..layer3 (detectron2's ``res4``, stride 16) as a one-level backbone."""

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer3": "0"})
        self.out_channels = 1024

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.body(x)


def _build(layout: str) -> FasterRCNN:
    """An untrained torchvision Faster R-CNN with the key layout of ``layout`` (unpatched)."""
    if layout == "fpn":
        return torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None,
                                            num_classes=2)
    spec = LAYOUTS["c4"]
    anchors = len(spec["sizes"][0]) * len(ASPECT_RATIOS)
    # The second stage is never run (proposals.source: rpn); a tiny one keeps the model light.
    return FasterRCNN(
        _C4Backbone(), num_classes=None, rpn_head=RPNHead(1024, anchors),
        rpn_anchor_generator=AnchorGenerator(spec["sizes"], (ASPECT_RATIOS,)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 1, 2), box_head=nn.Flatten(),
        box_predictor=FastRCNNPredictor(1024, 2),
    )


def build_rpn_detector(layout: str, state: dict | None = None, where: str = "checkpoint") -> FasterRCNN:
    """A torchvision Faster R-CNN proposal stage in detectron2's convention, ``state`` loaded.

    ``layout``: ``"fpn"``/``"c4"`` or a ``DETECTORS`` name (``detectron2_r50_fpn``). ``state``: a
    ``convert_rpn`` state dict (backbone + rpn keys; any ``roi_heads.*`` is ignored). Returns
    the model in eval mode; only its RPN is meaningful (``has_box_head`` is False).
    """
    layout = DETECTORS.get(layout, layout)
    if layout not in LAYOUTS:
        raise BadInput(f"unknown detectron2 RPN layout '{layout}': use {', '.join([*LAYOUTS, *DETECTORS])}")
    model = apply_detectron2_convention(_build(layout), layout)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("roi_heads.")}
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:200])
            raise WeightsUnavailable(
                f"{where}: does not fit a detectron2 R50-{layout.upper()} RPN: {first}") from None
        missing = [k for k in result.missing_keys if not k.startswith("roi_heads.")]
        if missing or result.unexpected_keys:
            raise missing_keys_error(where, f"the R50-{layout.upper()} RPN", missing or result.unexpected_keys)
    return model.eval()
