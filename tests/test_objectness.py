"""Proposals that keep unlabelled objects: the objectness losses, ignore regions, recall."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, box_iou

from regionclip.config import ProposalConfig
from regionclip.objectness import centerness, centerness_loss, ignore_negatives
from regionclip.proposals import ProposalStage
from regionclip.recall import ProposalRecall

SIDE = 64


def _world(seed: int, n: int = 16):
    """``n`` SIDExSIDE images, each with one labelled red square and one unlabelled red disc on
    grey noise: the disc shares the square's colour (as a novel category shares a base one's
    parts) and no box says it is an object. Returns images, labelled boxes, unlabelled boxes."""
    g = np.random.default_rng(seed)
    images, labelled, unlabelled = [], [], []
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for _ in range(n):
        img = np.clip(g.normal(0.5, 0.05, (3, SIDE, SIDE)), 0, 1).astype(np.float32)
        side = int(g.integers(14, 22))
        left = g.integers(0, 2) * 32  # the square in one half, the disc in the other
        x0, y0 = int(left + g.integers(2, 32 - side - 1)), int(g.integers(2, SIDE - side - 2))
        img[:, y0:y0 + side, x0:x0 + side] = np.array([0.9, 0.1, 0.1], np.float32)[:, None, None]
        r = int(g.integers(7, 11))
        cx, cy = int(32 - left + g.integers(r + 1, 32 - r - 1)), int(g.integers(r + 2, SIDE - r - 2))
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[:, disc] = np.array([0.9, 0.1, 0.1], np.float32)[:, None]
        images.append(torch.from_numpy(img))
        labelled.append(torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32))
        unlabelled.append(torch.tensor([[cx - r, cy - r, cx + r + 1, cy + r + 1]], dtype=torch.float32))
    return images, labelled, unlabelled


class _Backbone(nn.Module):
    out_channels = 32

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())

    def forward(self, x):
        return OrderedDict([("0", self.body(x))])


def _stage(seed: int = 0) -> ProposalStage:
    """A Faster R-CNN small enough to train in seconds: two strided convs, one stride-4 map."""
    torch.manual_seed(seed)
    backbone = _Backbone()
    detector = FasterRCNN(backbone, num_classes=2, min_size=SIDE, max_size=SIDE,
                          rpn_anchor_generator=AnchorGenerator(((12, 20),), ((1.0,),)),
                          box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2))
    return ProposalStage(detector, ProposalConfig(num_proposals=20, pre_nms_top_n=200, nms_threshold=0.5))


def _train(stage: ProposalStage, objectness: str, regions=None, steps: int = 120) -> ProposalStage:
    images, labelled, unlabelled = _world(seed=1)
    opt = torch.optim.Adam(stage.parameters(), lr=3e-3)
    stage.train()
    torch.manual_seed(0)
    for step in range(steps):
        pick = [(step * 4 + k) % len(images) for k in range(4)]
        targets = [{"boxes": labelled[i], "labels": torch.ones(1, dtype=torch.int64)} for i in pick]
        callback = (lambda _p, pick=pick: regions([unlabelled[i] for i in pick])) if regions else None
        _, losses = stage.forward_train([images[i] for i in pick], targets, objectness, callback)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return stage.eval()


def _kept(stage: ProposalStage) -> float:
    """How strongly the stage proposes unlabelled objects next to labelled ones, on images it
    never trained on: the mean objectness of the best proposal at IoU >= 0.5 on each unlabelled
    disc (0 if none) over the same on each labelled square. 1: proposed as readily."""
    images, labelled, unlabelled = _world(seed=2)
    best = {"labelled": [], "unlabelled": []}
    with torch.no_grad():
        for img, lab, unl in zip(images, labelled, unlabelled):
            (boxes, scores), = stage([img])
            for key, gt in (("labelled", lab), ("unlabelled", unl)):
                on = box_iou(boxes, gt)[:, 0] >= 0.5
                best[key].append(float(scores[on].max()) if on.any() else 0.0)
    return float(np.mean(best["unlabelled"]) / max(np.mean(best["labelled"]), 1e-6))


@pytest.fixture(scope="module")
def classify_kept():
    return _kept(_train(_stage(), "classify"))


def test_classifier_objectness_learns_to_reject_unlabelled_objects(classify_kept):
    """The failure the other tests fix, shown on today's RPN: trained with the disc as background
    it scores discs at about half the squares' objectness (0.36-0.51 over three seeds)."""
    assert classify_kept < 0.6, classify_kept


def test_centerness_objectness_keeps_proposing_unlabelled_objects(classify_kept):
    """OLN's positives-only localization quality, same training: discs score nearly as squares
    (0.91-0.96 over three seeds)."""
    kept = _kept(_train(_stage(), "centerness"))
    assert kept >= 0.85 and kept >= classify_kept + 0.25, (kept, classify_kept)


def test_caption_pseudo_boxes_as_positives_and_ignore_regions(classify_kept):
    """The classifier with the unlabelled objects' (caption pseudo-) boxes as ignore regions and
    RPN positives proposes them as it proposes labelled ones (0.98-1.00 over three seeds)."""
    kept = _kept(_train(_stage(), "classify", regions=lambda boxes: (boxes, boxes)))
    assert kept >= 0.85 and kept >= classify_kept + 0.25, (kept, classify_kept)


def test_centerness_values():
    points = torch.tensor([[5.0, 5.0], [2.0, 5.0], [0.0, 5.0], [12.0, 5.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).expand(4, 4)
    torch.testing.assert_close(centerness(points, boxes), torch.tensor([1.0, 0.5, 0.0, 0.0]))


def test_centerness_loss_trains_positives_only():
    """Anchors far from every box take no gradient: nothing pushes an unlabelled object down."""
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [40.0, 40.0, 50.0, 50.0]])]
    logits = torch.zeros(3, requires_grad=True)
    loss = centerness_loss(logits, anchors, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], samples_per_image=8)
    loss.backward()
    assert logits.grad[0] < 0 and logits.grad[1] != 0 and logits.grad[2] == 0, logits.grad
    empty = centerness_loss(logits, anchors, [torch.zeros((0, 4))], samples_per_image=8)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_ignore_negatives_only_touches_background_near_ignore_boxes():
    anchors = [torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40], [31, 31, 41, 41], [80, 80, 90, 90]])]
    labels = [torch.tensor([1.0, 0.0, 0.0, 0.0])]
    out = ignore_negatives(labels, anchors, [torch.tensor([[30.0, 30, 40, 40], [0, 0, 10, 10]])])
    torch.testing.assert_close(out[0], torch.tensor([1.0, -1.0, -1.0, 0.0]))
    assert torch.equal(ignore_negatives(labels, anchors, [None])[0], labels[0])


class _Coco:
    """The slice of pycocotools' ``COCO`` that ``ProposalRecall`` reads."""

    def __init__(self, anns):
        self.cats = {1: {"id": 1, "name": "a"}, 2: {"id": 2, "name": "b"}}
        self.imgToAnns = {}
        for a in anns:
            self.imgToAnns.setdefault(a["image_id"], []).append(a)


def test_proposal_recall_per_split_and_top_k():
    coco = _Coco([
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10]},
        {"image_id": 1, "category_id": 2, "bbox": [80, 80, 10, 10], "iscrowd": 1},  # not counted
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20]},
    ])
    recall = ProposalRecall(coco, {"base": ["a"], "novel": ["b"]}, tops=(1, 2))
    # Image 1: the base box is found by the best proposal, the novel one only by the second,
    # and at IoU 0.81 (found at 0.50..0.80, 7 of 10 thresholds).
    recall.add(1, torch.tensor([[0.0, 0, 10, 10], [50, 50, 59, 59], [200, 200, 210, 210]]),
               torch.tensor([0.9, 0.5, 0.4]))
    recall.add(2, torch.zeros((0, 4)), torch.zeros(0))  # no proposals: nothing found
    recall.add(3, torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([1.0]))  # no ground truth: ignored
    got = recall.summary()
    assert got["base"] == {"gt": 1, "R50@1": 100.0, "AR@1": 100.0, "R50@2": 100.0, "AR@2": 100.0}, got
    assert got["novel"]["gt"] == 2 and got["novel"]["R50@1"] == 0.0, got
    assert got["novel"]["R50@2"] == 50.0 and got["novel"]["AR@2"] == 35.0, got
    assert got["overall"]["gt"] == 3 and got["overall"]["R50@2"] == pytest.approx(66.67), got


def test_proposal_recall_is_cocoevals_average_recall():
    """AR@K and R50@K equal pycocotools' COCOeval with ``useCats=0`` (one-to-one matching): one
    proposal over two touching boxes finds one of them, crowds and images without boxes included."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    boxes = {1: [[0, 0, 10, 10], [2, 0, 10, 10], [40, 40, 20, 12]], 2: [[5, 5, 30, 30]], 3: [],
             4: [[0, 0, 20, 20], [30, 30, 8, 8]]}
    anns = [{"id": i + 1, "image_id": im, "category_id": 1 + i % 2, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (im, b) in enumerate((im, b) for im, bs in boxes.items() for b in bs)]
    anns.append({"id": 99, "image_id": 4, "category_id": 1, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 1})
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in boxes], "annotations": anns,
                  "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    gt.createIndex()
    proposals = {  # xyxy, score
        1: [([1, 0, 11, 10], 0.9), ([0, 0, 10, 10], 0.8), ([41, 40, 60, 53], 0.7), ([2, 1, 12, 10], 0.3)],
        2: [([6, 4, 36, 33], 0.6), ([5, 5, 35, 35], 0.5)],
        3: [([0, 0, 5, 5], 0.9)],
        4: [([61, 61, 90, 90], 0.95), ([1, 1, 21, 19], 0.9), ([0, 0, 19, 21], 0.8), ([31, 30, 38, 39], 0.2)],
    }
    tops = (1, 2, 3)
    recall = ProposalRecall(gt, None, tops=tops)
    records = []
    for im, props in proposals.items():
        recall.add(im, torch.tensor([b for b, _ in props], dtype=torch.float32), torch.tensor([s for _, s in props]))
        records += [{"image_id": im, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
                    for (x1, y1, x2, y2), s in props]
    ev = COCOeval(gt, gt.loadRes(records), "bbox")
    ev.params.useCats, ev.params.maxDets = 0, list(tops)
    ev.evaluate()
    ev.accumulate()
    got = recall.summary()["overall"]
    for m, k in enumerate(tops):
        coco = ev.eval["recall"][:, 0, 0, m]  # (IoU thresholds,) at area "all"
        assert got[f"AR@{k}"] == pytest.approx(100 * coco.mean(), abs=0.01), (k, got, coco)
        assert got[f"R50@{k}"] == pytest.approx(100 * coco[0], abs=0.01), (k, got, coco)
    # Top 1: image 1's proposal overlaps its first two boxes at IoU 0.82 each and finds one of them,
    # image 2's finds its box, image 4's lies on the crowd: 2 of 6 boxes.
    assert got["R50@1"] == pytest.approx(100 * 2 / 6, abs=0.01), got


def test_proposal_score_floor_is_configurable_and_restorable():
    """``proposals.score_threshold``: None keeps the builder's floor (0.05 for MobileNet-320),
    a number replaces it, and reconfiguring with None brings the builder's back."""
    from dataclasses import replace

    from conftest import tiny_model
    from regionclip.errors import BadInput

    model = tiny_model()
    rpn = model.proposals.detector.rpn
    assert rpn.score_thresh == pytest.approx(0.05)
    model.proposals.configure(replace(model.cfg.proposals, score_threshold=0.0))
    assert rpn.score_thresh == 0.0
    model.proposals.configure(replace(model.cfg.proposals, score_threshold=None))
    assert rpn.score_thresh == pytest.approx(0.05)
    with pytest.raises(BadInput, match="score_threshold must be in"):
        model.proposals.configure(replace(model.cfg.proposals, score_threshold=1.5))


def test_bf16_autocast_keeps_proposal_geometry_and_logits_in_fp32():
    """Under bf16 autocast (what precision auto runs on CUDA; CPU autocasts the same way) the
    anchors equal the fp32 ones, decoded boxes keep sub-pixel coordinates past 512 px (bf16 has
    8 mantissa bits: every coordinate there a multiple of 4), and region logits are fp32 values."""
    from dataclasses import replace

    from conftest import tiny_model
    from regionclip.scoring import region_logits

    model = tiny_model()
    stage = model.proposals
    stage.configure(replace(model.cfg.proposals, min_size=800, max_size=1216))
    torch.manual_seed(0)
    images = [torch.rand(3, 800, 1216)]
    with torch.inference_mode():
        batch, _ = stage.detector.transform(images)
        features = stage.detector.backbone(batch.tensors)
        _, _, (_, _, anchors32) = stage._rpn(batch, features)
        with torch.autocast("cpu", torch.bfloat16):
            half = {k: v.bfloat16() for k, v in features.items()}  # what autocast's backbone hands on
            boxes, _, (_, deltas, anchors16) = stage._rpn(batch, half)
    assert anchors16[0].dtype == torch.float32 and deltas.dtype == torch.float32
    torch.testing.assert_close(anchors16[0], anchors32[0], rtol=0, atol=0)
    far = boxes[0][boxes[0] > 512]
    assert len(far) and bool((far % 4 != 0).any()), far[:8]

    regions, text = torch.randn(50, 32), torch.nn.functional.normalize(torch.randn(7, 32), dim=-1)
    want = region_logits(regions, text, 100.0, True)
    with torch.autocast("cpu", torch.bfloat16):
        got = region_logits(regions, text, 100.0, True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)


def test_final_boxes_are_decoded_in_fp32_under_bf16_autocast():
    """``proposals.source: final`` under bf16 autocast: each of the second stage's boxes lies within
    what bf16 deltas move it (hundredths of a pixel) of an fp32 one (bf16 scores may order and
    suppress a little differently), not rounded to bf16's steps (4 px past 512, 8 past 1024)."""
    from dataclasses import replace

    from conftest import tiny_model

    model = tiny_model()
    stage = model.proposals
    stage.configure(replace(model.cfg.proposals, min_size=800, max_size=1216, source="final"))
    torch.manual_seed(0)
    images = [torch.rand(3, 800, 1216)]
    with torch.inference_mode():
        batch, _ = stage.detector.transform(images)
        features = stage.detector.backbone(batch.tensors)
        proposals, _, _ = stage._rpn(batch, features)
        want, want_scores = stage._final_boxes(batch, features, proposals)
        with torch.autocast("cpu", torch.bfloat16):
            got, got_scores = stage._final_boxes(batch, features, proposals)
    assert got[0].dtype == torch.float32 and got_scores[0].dtype == torch.float32 and len(got[0])
    nearest = torch.cdist(got[0], want[0], p=float("inf")).min(dim=1).values
    assert float(nearest.max()) < 0.25, nearest.max()
    far = got[0][got[0] > 512]
    assert len(far) and bool((far % 4 != 0).any()), far[:8]
