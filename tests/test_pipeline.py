"""The detection pipeline on tiny random models: coordinates, batching, modes, scoring, text cache."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shapes_image, tiny_model

from regionclip import RegionCLIP
from regionclip.config import ScoringConfig
from regionclip.detector import score_regions
from regionclip.errors import BadConfig, BadInput

LABELS = ["red circle", "green square", "blue triangle"]


@pytest.mark.parametrize("size", [(120, 160), (333, 97)])
def test_given_boxes_round_trip_in_original_pixels(models, size):
    h, w = size
    img = shapes_image(h, w)
    boxes = torch.tensor([[0.0, 0.0, w, h], [3.25, 4.5, w / 2 + 0.125, h / 3], [10, 10, 10, 30]])
    for key in [("vit", "crop"), ("rn", "pool"), ("vit", "pool")]:
        dets = models(*key).detect(img, LABELS, boxes=boxes)
        assert torch.equal(dets.boxes_xyxy, boxes)  # exactly, in input order
        assert len(dets) == 3


@pytest.mark.parametrize("size", [(120, 160), (300, 90)])
def test_proposals_lie_inside_the_original_image(models, size):
    img = shapes_image(*size)
    dets = models("vit", "crop").detect(img, LABELS, score_threshold=0.0)
    assert len(dets) > 0
    b = dets.boxes_xyxy
    assert float(b[:, [0, 2]].min()) >= 0 and float(b[:, [0, 2]].max()) <= size[1]
    assert float(b[:, [1, 3]].min()) >= 0 and float(b[:, [1, 3]].max()) <= size[0]
    assert float(dets.scores.min()) >= 0 and float(dets.scores.max()) <= 1


@pytest.mark.parametrize("key", [("vit", "crop"), ("rn", "pool"), ("vit", "pool")])
def test_batch_equals_one_at_a_time(models, key):
    model = models(*key)
    imgs = [shapes_image(120, 160, 0), shapes_image(120, 160, 1), shapes_image(96, 200, 2), shapes_image(120, 160, 3)]
    batched = model.detect(imgs, LABELS, score_threshold=0.0, batch_size=3)
    for img, b in zip(imgs, batched):
        one = model.detect(img, LABELS, score_threshold=0.0)
        assert len(one) == len(b)
        torch.testing.assert_close(one.boxes_xyxy, b.boxes_xyxy, atol=1e-3, rtol=0)
        torch.testing.assert_close(one.scores, b.scores, atol=1e-4, rtol=0)
        assert torch.equal(one.label_ids, b.label_ids)


@pytest.mark.parametrize("arch,mode", [("vit", "crop"), ("vit", "pool"), ("rn", "crop"), ("rn", "pool")])
def test_embeddings_are_unit_norm_in_the_joint_space(models, arch, mode):
    model = models(arch, mode)
    boxes = torch.tensor([[10.0, 10, 60, 50], [10.0, 10, 60, 50], [0, 0, 160, 120]])
    emb = model.encode_regions(shapes_image(), boxes)
    text = model.encode_text(LABELS)
    assert emb.shape == (3, 32) and text.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[1])  # the same box twice, the same vector


def test_fast_resnet_pool_variant():
    model = tiny_model("rn", "pool", **{})
    model.regions.cfg = dataclasses.replace(model.regions.cfg, pool_variant="fast")
    emb = model.encode_regions(shapes_image(), torch.tensor([[10.0, 10, 60, 50]]))
    assert emb.shape == (1, 32)


def test_resnet_pool_reproduces_encode_image_at_224():
    model = tiny_model("rn", "pool")
    model.regions.cfg = dataclasses.replace(model.regions.cfg, pool_short_side=224, pool_max_side=224)
    img = shapes_image(224, 224)
    region = model.encode_regions(img, torch.tensor([[0.0, 0.0, 224.0, 224.0]]))
    x = model.regions.normalize(torch.from_numpy(img).permute(2, 0, 1).float() / 255)[None]
    with torch.no_grad():
        whole = F.normalize(model.clip.encode_image(x), dim=-1)
    torch.testing.assert_close(region, whole, atol=1e-5, rtol=1e-4)


def test_crop_pads_outside_the_image_with_the_mean_colour(models):
    enc = models("vit", "crop").regions
    img = torch.ones(3, 40, 40)
    crops = enc.crops([img], [torch.tensor([[0.0, 0.0, 40.0, 40.0]])])  # enlarged 1.5x: a margin falls outside
    assert crops.shape == (1, 3, 32, 32)
    assert float(crops[0, :, 0, 0].abs().max()) < 1e-6  # corner = normalised mean colour = 0
    assert float(crops[0, :, 16, 16].min()) > 1  # centre = white


def _scoring(**kw):
    return dataclasses.replace(ScoringConfig(), **{"agnostic_nms": False, **kw})


def test_scores_threshold_nms_and_max_detections():
    text = torch.eye(3)
    emb = F.normalize(torch.tensor([[1.0, 0.1, 0], [1.0, 0.12, 0], [0, 1.0, 0], [0, 0, 1.0], [0.1, 0, 1.0]]), dim=-1)
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90.0]])
    obj = torch.tensor([0.9, 0.8, 0.9, 0.4, 0.9])
    d = score_regions(emb, text, boxes, obj, _scoring(score_threshold=0.0), 100.0, ["a", "b", "c"])
    # boxes 0 and 1 are class a and overlap (IoU 0.68): NMS keeps the higher; box 2 (class b) survives.
    assert sorted(d.names) == ["a", "b", "c", "c"]
    d = score_regions(emb, text, boxes, obj, _scoring(score_threshold=0.0, nms_iou=0.9), 100.0, ["a", "b", "c"])
    assert len(d) == 5
    d = score_regions(emb, text, boxes, obj, _scoring(score_threshold=0.7), 100.0, ["a", "b", "c"])
    assert float(d.scores.min()) >= 0.7 and len(d) == 3  # the 0.4-objectness box falls below
    d = score_regions(emb, text, boxes, obj, _scoring(score_threshold=0.0, max_detections=2), 100.0, ["a", "b", "c"])
    assert len(d) == 2 and torch.all(d.scores[:-1] >= d.scores[1:])


def test_agnostic_nms_keeps_one_box_per_object():
    text = torch.eye(3)
    # Boxes 0 and 1 overlap (IoU 0.68) with different best labels; box 2 stands apart.
    emb = F.normalize(torch.tensor([[1.0, 0.2, 0], [0.1, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]])
    obj = torch.tensor([0.9, 0.5, 0.9])
    per_label = score_regions(emb, text, boxes, obj, _scoring(score_threshold=0.0), 100.0, ["a", "b", "c"])
    assert sorted(per_label.names) == ["a", "b", "c"]
    agnostic = score_regions(emb, text, boxes, obj, _scoring(score_threshold=0.0, agnostic_nms=True, agnostic_nms_iou=0.5),
                             100.0, ["a", "b", "c"])
    assert sorted(agnostic.names) == ["a", "c"]  # the weaker of the overlapping pair goes
    loose = score_regions(emb, text, boxes, obj, _scoring(score_threshold=0.0, agnostic_nms=True, agnostic_nms_iou=0.7),
                          100.0, ["a", "b", "c"])
    assert len(loose) == 3  # IoU 0.68 is under a 0.7 threshold


def test_objectness_fusion_is_a_weighted_geometric_mean():
    text = torch.eye(2)
    emb = torch.tensor([[1.0, 0.0]])
    obj = torch.tensor([0.25])
    p = torch.softmax(torch.tensor([100.0, 0.0]), 0)[0]
    for w in (0.0, 0.5, 1.0):
        d = score_regions(emb, text, torch.tensor([[0, 0, 1, 1.0]]), obj, _scoring(objectness_weight=w, score_threshold=0), 100.0, ["a", "b"])
        assert float(d.scores[0]) == pytest.approx(float(p ** (1 - w) * 0.25 ** w), rel=1e-5)


def test_background_and_top_k():
    text = torch.eye(2)
    emb = torch.tensor([[0.0, 0.0]])  # matches nothing: the background column wins half the mass
    d = score_regions(emb, text, torch.tensor([[0, 0, 1, 1.0]]), None, _scoring(background=True, score_threshold=0, top_k=2), 1.0, ["a", "b"])
    assert len(d) == 2 and d.scores.tolist() == pytest.approx([1 / 3, 1 / 3])


def test_text_cache_memory_and_disk(tmp_path):
    base = tiny_model("vit")
    ckpt = tmp_path / "clip.pt"
    torch.save(base.clip.state_dict(), ckpt)
    kw = dict(clip_model="test-vit-tiny", clip_pretrained=str(ckpt), detector="fasterrcnn_mobilenet_v3_large_320_fpn",
              detector_weights="none", device="cpu")
    m1 = RegionCLIP(**kw, text={"templates": ["a {}.", "the {}"], "chunk_size": 4, "cache_dir": str(tmp_path / "cache")})
    first = m1.encode_text(LABELS)
    assert m1.text.prompts_encoded == 6
    again = m1.encode_text(LABELS[::-1])
    assert m1.text.prompts_encoded == 6  # memory hit
    torch.testing.assert_close(again, first.flip(0))
    m2 = RegionCLIP(**kw, text={"templates": ["a {}.", "the {}"], "chunk_size": 4, "cache_dir": str(tmp_path / "cache")})
    torch.testing.assert_close(m2.encode_text(LABELS), first)
    assert m2.text.prompts_encoded == 0  # disk hit: nothing encoded
    m2.encode_text(["purple star"])
    assert m2.text.prompts_encoded == 2


@pytest.mark.parametrize("ensemble", ["normalized", "regionclip"])
def test_weights_from_a_file_cache_embeddings_in_the_user_cache(tmp_path, monkeypatch, ensemble):
    """RegionCLIP's presets encode 81 prompts a name: without a disk cache by default, every
    ``detect`` call encoded them all again. Random weights and ``disk_cache: false`` keep none."""
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "user"))
    ckpt = tmp_path / "clip.pt"
    torch.save(tiny_model("vit").clip.state_dict(), ckpt)
    kw = dict(clip_model="test-vit-tiny", clip_pretrained=str(ckpt), detector="fasterrcnn_mobilenet_v3_large_320_fpn",
              detector_weights="none", device="cpu", distractors="none")
    text = {"templates": ["a {}.", "the {}"], "ensemble": ensemble}
    first = RegionCLIP(**kw, text=text).encode_text(LABELS)
    again = RegionCLIP(**kw, text=text)
    torch.testing.assert_close(again.encode_text(LABELS), first)
    assert again.text.prompts_encoded == 0 and len(list((tmp_path / "user").glob("text-*.pt"))) == 1
    off = RegionCLIP(**kw, text={**text, "disk_cache": False})
    off.encode_text(LABELS)
    assert off.text.prompts_encoded == 2 * len(LABELS) and off.text.cache_file is None
    random = RegionCLIP(**{**kw, "clip_pretrained": "none"}, text=text)
    random.encode_text(LABELS)
    assert random.text.cache_file is None and len(list((tmp_path / "user").glob("text-*.pt"))) == 1
    given = RegionCLIP(**{**kw, "clip_pretrained": "none"}, text={**text, "cache_dir": str(tmp_path / "mine")})
    assert given.text.cache_file.parent == tmp_path / "mine"  # a folder given is used, whatever the weights


def test_long_vocabularies_are_chunked(models):

    model = models("vit", "crop")
    labels = [f"thing {i}" for i in range(40)]
    before = model.text.prompts_encoded
    emb = model.encode_text(labels)
    assert emb.shape == (40, 32) and model.text.prompts_encoded - before == 40 * len(model.text.templates)


def test_bad_api_inputs(models):
    model = models("vit", "crop")
    with pytest.raises(BadInput, match="non-empty"):
        model.detect(shapes_image(), [])
    with pytest.raises(BadInput, match=r"shape \(N, 4\)"):
        model.detect(shapes_image(), LABELS, boxes=torch.zeros(3))
    with pytest.raises(BadInput, match="2 images but 1 box"):
        model.detect([shapes_image(), shapes_image()], LABELS, boxes=[torch.zeros(1, 4)])
    with pytest.raises(BadConfig, match=r"score_threshold must be in \[0, 1\]"):
        model.detect(shapes_image(), LABELS, score_threshold=2)
    with pytest.raises(BadConfig, match="max_detections must be at least 1"):
        model.detect(shapes_image(), LABELS, max_detections=0)
    with pytest.raises(BadInput, match="batch_size must be at least 1"):
        model.detect([shapes_image()], LABELS, batch_size=0)
    with pytest.raises(BadInput, match="unknown region mode"):
        tiny_model(mode="grid")
    with pytest.raises(BadInput, match="unknown device"):
        tiny_model(device="tpu")


def test_openai_tags_build_quick_gelu_and_checkpoints_keep_it(tmp_path, monkeypatch):
    """OpenAI's CLIPs were trained with QuickGELU; open_clip's plain names build GELU unless told."""
    import open_clip

    import regionclip.weights as W

    assert W.pretrained_cfg("RN50", "openai")["quick_gelu"] and W.pretrained_cfg("ViT-B-16", "openai")["quick_gelu"]
    assert W.pretrained_cfg("RN50", "none") == {}
    # A tag that asks for QuickGELU, with no download: random weights under that tag's metadata.
    monkeypatch.setattr(W, "pretrained_cfg", lambda model, spec: {"quick_gelu": True})
    monkeypatch.setattr(W, "resolve_clip", lambda model, spec: W.Resolved(model, spec, None))
    torch.manual_seed(0)
    model = RegionCLIP(clip_model="test-vit-tiny", clip_pretrained="openai", detector="fasterrcnn_mobilenet_v3_large_320_fpn",
                       detector_weights="none", device="cpu")
    assert any(isinstance(m, open_clip.model.QuickGELU) for m in model.clip.modules())
    model.save(tmp_path / "m.pt")
    again = RegionCLIP(clip_model="test-vit-tiny", detector="fasterrcnn_mobilenet_v3_large_320_fpn",
                       checkpoint=str(tmp_path / "m.pt"), device="cpu")
    assert any(isinstance(m, open_clip.model.QuickGELU) for m in again.clip.modules())
    img = shapes_image()
    boxes = torch.tensor([[0.0, 0.0, 80, 60]])
    torch.testing.assert_close(again.encode_regions(img, boxes), model.encode_regions(img, boxes))


def test_classify_rows_leave_the_background_its_share_as_documented():
    """With a background column the softmax runs over it too and drops it: rows sum below 1, as
    ``classify``'s docstrings and docs/detect.md say; without one they sum to 1."""
    from regionclip.predictor import Predictor

    img, xyxy = shapes_image(), [[10.0, 10.0, 60.0, 50.0], [70.0, 50.0, 120.0, 100.0]]
    for background in (True, False):
        model = tiny_model(scoring={"background": background, "logit_scale": 10.0})
        (probs,) = model.classify([img], ["red circle", "green square"], [xyxy])
        sums = probs.sum(dim=1)
        assert bool((sums < 1 - 1e-4).all()) if background else torch.allclose(sums, torch.ones(2)), sums
    for doc in (RegionCLIP.classify.__doc__, Predictor.classify.__doc__):
        assert "1 - row.sum()" in doc and "background" in doc
