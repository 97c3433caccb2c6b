"""``ImageBatch`` and the staged path: padding, coordinates, grouping, stages == detect."""

import numpy as np
import torch
from conftest import shapes_image

from regionclip.batch import ImageBatch, aspect_groups
from regionclip.io import LoadedImage

LABELS = ["red circle", "green square", "blue triangle"]


def test_padding_sizes_and_coordinates():
    a, b = torch.rand(3, 50, 70), torch.rand(3, 64, 40)
    batch = ImageBatch.from_tensors([a, b], original_sizes=[(100, 140), (64, 40)])
    assert batch.tensor.shape == (2, 3, 64, 96)  # padded to multiples of 32
    assert torch.equal(batch.images()[0], a) and torch.equal(batch.images()[1], b)
    assert float(batch.tensor[0, :, 50:].abs().sum()) == 0 and float(batch.tensor[0, :, :, 70:].abs().sum()) == 0
    boxes = torch.tensor([[10.0, 5.0, 20.0, 25.0]])
    torch.testing.assert_close(batch.to_original(0, boxes), torch.tensor([[20.0, 10.0, 40.0, 50.0]]))
    torch.testing.assert_close(batch.to_batch(0, batch.to_original(0, boxes)), boxes)
    assert batch.to_original(1, boxes) is boxes  # not reduced: untouched


def test_from_loaded_converts_on_the_device_side():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    batch = ImageBatch.from_loaded([LoadedImage(pixels, (4, 6))], size_divisible=1)
    assert batch.tensor.shape == (1, 3, 2, 3) and batch.original_sizes == [(4, 6)]
    torch.testing.assert_close(batch.tensor[0], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def test_aspect_groups_keep_orientations_apart_and_cover_every_image():
    sizes = [(100, 200), (200, 100), (100, 190), (150, 150), (120, 100), (100, 400)]
    groups = aspect_groups(sizes, batch_size=2)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert all(len(g) <= 2 for g in groups)
    for g in groups:
        assert len({sizes[i][1] >= sizes[i][0] for i in g}) == 1  # never portrait with landscape
    assert [1, 4] in groups  # the two portrait images together


def test_stage_by_stage_equals_detect(models):
    model = models("vit", "crop")
    imgs = [shapes_image(120, 160, 0), shapes_image(100, 150, 1)]
    expected = model.detect(imgs, LABELS, score_threshold=0.0, batch_size=2)
    with torch.inference_mode():
        text = model.encode_text(LABELS)
        batch = model.batch(model.load(imgs))
        boxes, objectness = model.propose(batch)
        regions = model.embed(batch, boxes)
        logits = model.logits(regions, text)
        assert logits.shape == (sum(len(b) for b in boxes), len(LABELS))
        scoring = model.scoring_config(score_threshold=0.0)
        got = model.postprocess(batch, boxes, objectness, logits, LABELS, scoring)
    for e, g in zip(expected, got):
        assert torch.equal(e.boxes_xyxy, g.boxes_xyxy) and torch.equal(e.label_ids, g.label_ids)
        torch.testing.assert_close(e.scores, g.scores)


def test_logits_background_column(models):
    model = models("rn", "pool")
    regions, text = torch.randn(4, 32), torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    assert model.logits(regions, text, background=False).shape == (4, 3)
    with_bg = model.logits(regions, text, background=True, scale=10.0)
    assert with_bg.shape == (4, 4) and float(with_bg[:, -1].abs().sum()) == 0


def test_classify_equals_detect_with_given_boxes(models):
    model = models("rn", "pool")
    img = shapes_image(120, 160)
    boxes = torch.tensor([[0.0, 0.0, 80, 60], [40, 30, 150, 110]])
    (probs,) = model.classify([img], LABELS, [boxes])
    dets = model.detect(img, LABELS, boxes=boxes, top_k=len(LABELS))
    assert probs.shape == (2, 3)
    scattered = torch.zeros(2, 3).scatter_(1, dets.label_ids.view(2, 3), dets.scores.view(2, 3))
    torch.testing.assert_close(probs, scattered)
