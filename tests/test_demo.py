"""The shipped demo model and the commands around it, offline: make-shapes, demo, detect --model demo."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from test_cli import run
from torchvision.ops import box_iou

from regionclip import RegionCLIP
from regionclip.data.shapes import CATEGORIES
from regionclip.errors import WeightsUnavailable

DEMO_MB_LIMIT = 25


def test_demo_checkpoint_is_small_and_refines_its_boxes():
    model = RegionCLIP.from_pretrained("demo", device="cpu")
    assert os.path.getsize(model.cfg.checkpoint) < DEMO_MB_LIMIT * 2**20
    assert model.cfg.proposals.source == "refined" and model.proposals.detector.has_box_head
    assert model.proposals.detector.roi_heads.box_head.fc7.out_features == 128  # the narrow second stage
    assert model.refines_boxes


def test_rpn_only_checkpoints_refuse_a_second_stage(tmp_path):
    model = RegionCLIP.from_pretrained("demo", device="cpu")
    model.save(tmp_path / "rpn_only.pt", half=True, box_head=False)
    with pytest.raises(WeightsUnavailable, match="without its box head"):
        RegionCLIP.from_pretrained("demo", device="cpu", overrides=[f"checkpoint={tmp_path / 'rpn_only.pt'}"])


def test_make_shapes_command(tmp_path, capsys):
    code, out, err = run(["make-shapes", str(tmp_path / "s"), "--train", "2", "--val", "1",
                          "--min-side", "96", "--max-side", "128"], capsys)
    assert code == 0, err
    ann = json.loads((tmp_path / "s" / "annotations" / "instances_train.json").read_text())
    assert len(ann["images"]) == 2 and [c["name"] for c in ann["categories"]] == CATEGORIES
    assert all(96 <= im["height"] <= 128 and 96 <= im["width"] <= 128 for im in ann["images"])


def test_demo_command_draws_and_detects(tmp_path, capsys):
    code, out, err = run(["demo", "--out", str(tmp_path / "demo")], capsys)
    assert code == 0, err
    for name in ("input.jpg", "detections.jpg"):
        assert cv2.imread(str(tmp_path / "demo" / name)) is not None
    assert "annotated image" in out


def test_detect_model_demo_on_an_image_the_generator_did_not_draw(tmp_path, capsys):
    """White page (no generated background is white), a size the generator never draws, an
    upright triangle (generated ones are rotated at random): the demo model must still find
    each shape and name it. Base names only: how novel names fare here is in the README."""
    img = np.full((360, 480, 3), 255, np.uint8)
    cv2.circle(img, (110, 120), 45, (0, 215, 255), -1)  # BGR: yellow circle
    cv2.fillPoly(img, [np.array([[330, 60], [400, 180], [260, 180]])], (220, 70, 35))  # BGR: blue triangle
    truth = {"yellow circle": [65, 75, 155, 165], "blue triangle": [260, 60, 400, 180]}
    cv2.imwrite(str(tmp_path / "page.png"), img)
    code, out, err = run(["detect", str(tmp_path / "page.png"), "--model", "demo", "--device", "cpu",
                          "--labels", ",".join(CATEGORIES), "--json", str(tmp_path / "d.json")], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "d.json").read_text())
    boxes = torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                          for r in records]).reshape(-1, 4)
    for name, box in truth.items():
        ious = box_iou(torch.tensor([box], dtype=torch.float), boxes)[0]
        overlapping = [r for r, iou in zip(records, ious) if iou >= 0.5]
        assert overlapping, f"no detection on the {name}: {records}"
        assert max(overlapping, key=lambda r: r["score"])["label"] == name, records


def test_mixed_sizes_in_one_padded_batch_match_one_image_at_a_time():
    """Images of different sizes share one zero-padded batch. The trained detector's features
    near the padding move a little (MobileNetV3's squeeze-excitation pools the whole map), so
    detections are compared by overlap (shapes val, batch 8: the mean best IoU of a batched
    proposal to the image's own was 0.967; val AP50 67.7 one at a time, 68.1 batched).
    Portrait and landscape images never share a batch: padding a portrait image to a square
    moved its proposals much more."""
    from regionclip.data.shapes import render_shapes_image

    model = RegionCLIP.from_pretrained("demo", device="cpu")
    rng = np.random.default_rng(3)
    images = [render_shapes_image(rng, size=size, empty_prob=0.0)[0]
              for size in [(192, 320), (256, 256), (224, 300), (288, 300)]]
    batched = model.detect(images, CATEGORIES, batch_size=4)
    for img, together in zip(images, batched):
        alone = model.detect(img, CATEGORIES)
        assert len(alone) and len(together)
        best = box_iou(alone.boxes_xyxy, together.boxes_xyxy).max(dim=1)
        assert float(best.values.mean()) >= 0.9, best
        agree = [a == together.names[j] for a, j in zip(alone.names, best.indices.tolist())]
        assert sum(agree) >= 0.9 * len(agree), (alone.names, together.names)
