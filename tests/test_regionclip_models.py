"""RegionCLIP's released models run through regionclip's stages: import -> preset -> detect/eval.

Files are built in RegionCLIP's layout from random tensors (``test_regionclip_import``'s builders: a
tiny-width CLIP, full-size detectron2 R50 RPNs) and run on small images at a small input size.
The recipe is checked against RegionCLIP's inference (``fast_rcnn.py``, ``soft_nms.py``)
transcribed here from its source, on the features and proposals of the model's own stages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import pytest
import torch
import torch.nn.functional as F
from conftest import shapes_image, tiny_model
from test_cli import run
from test_regionclip_import import TINY, _clip_state, _finetuned, _image, _rpn_state, ref_proposals
from torchvision.ops import batched_nms, box_iou

from regionclip import RegionCLIP, zoo
from regionclip.config import ModelConfig, ProposalConfig, load_config, to_dict
from regionclip.errors import BadConfig, BadInput, WeightsUnavailable
from regionclip.proposals import ProposalStage
from regionclip.scoring import batched_soft_nms

# Small inputs for full-size R50 RPNs on 2 CPU cores; the recipe does not depend on the size.
SMALL = ["device=cpu", f"clip_model={TINY}", "proposals.min_size=64", "proposals.max_size=128",
         "regions.pool_short_side=64", "regions.pool_max_side=128"]
NAMES = ["person", "dog", "hot dog", "traffic light", "cat"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """RegionCLIP's files (tiny CLIP), imported as `regionclip import` does, and a concept file."""
    d = tmp_path_factory.mktemp("regionclip_files")
    pretrained = _clip_state()
    fine = {**_finetuned(pretrained), **{"offline_" + k: v for k, v in _rpn_state("c4", seed=1).items()}}
    g = torch.Generator().manual_seed(7)
    # A learned background (RegionCLIP's released one is zero) that competes with the classes: along
    # the tiny tower's features, which point much the same way for every region of random weights.
    clip = zoo.build_clip(TINY, zoo.convert_clip(pretrained)[0])
    with torch.no_grad():
        common = F.normalize(clip.encode_image(torch.rand(4, 3, 64, 64, generator=g)).mean(0, keepdim=True), dim=1)
    fine["roi_heads.box_predictor.cls_bg_score.weight"] = 0.25 * common
    paths = {"pretrained": d / "regionclip_pretrained-cc_tiny.pth", "finetuned": d / "regionclip_finetuned-coco_tiny.pth",
             "rpn_lvis": d / "rpn_lvis_866.pth", "emb": d / "coco_5_cls_emb.pth", "names": d / "names.txt"}
    torch.save({"model": pretrained}, paths["pretrained"])
    torch.save({"model": fine}, paths["finetuned"])
    torch.save({"model": _rpn_state("fpn")}, paths["rpn_lvis"])
    torch.save(torch.randn(5, 32, generator=g) * 2, paths["emb"])  # un-normalised means, as RegionCLIP writes
    paths["names"].write_text("\n".join(NAMES) + "\n")
    paths["cc"] = zoo.import_regionclip(paths["pretrained"], paths["rpn_lvis"], d / "out").preset
    paths["coco"] = zoo.import_regionclip(paths["finetuned"], paths["finetuned"], d / "out",
                                          text_from=paths["pretrained"]).preset
    return paths


@pytest.fixture(scope="module")
def coco_model(files):
    return RegionCLIP.from_pretrained(str(files["coco"]), SMALL)


@pytest.fixture(scope="module")
def cc_model(files):
    return RegionCLIP.from_pretrained(str(files["cc"]), SMALL)


# ------------------------------------------------------ RegionCLIP's inference, transcribed
def _d2_pairwise_iou(a, b):
    """detectron2 structures.boxes.pairwise_iou (0 where boxes do not intersect)."""
    area_a, area_b = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(dim=2)
    return torch.where(inter > 0, inter / (area_a[:, None] + area_b - inter), torch.zeros(1, dtype=inter.dtype))


def ref_soft_nms(boxes, scores, idxs, sigma=0.5, prune=0.001):
    """detectron2/layers/soft_nms.py batched_soft_nms + _soft_nms, method 'gaussian'."""
    boxes = boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]
    scores, order = scores.clone(), torch.arange(len(scores))
    idxs_out, scores_out = [], []
    while scores.numel() > 0:
        top = torch.argmax(scores)
        idxs_out.append(order[top].item())
        scores_out.append(scores[top].item())
        ious = _d2_pairwise_iou(boxes[top][None], boxes)[0]
        scores *= torch.exp(-torch.pow(ious, 2) / sigma)
        keep = scores > prune
        keep[top] = False
        boxes, scores, order = boxes[keep], scores[keep], order[keep]
    return torch.tensor(idxs_out), torch.tensor(scores_out)


def ref_inference(feats, proposals, image_size, concept, predictor=None, rpn_logits=None, soft=False):
    """FastRCNNOutputLayers.forward / predict_boxes / predict_probs / inference and
    fast_rcnn_inference_single_image (roi_heads/fast_rcnn.py) for one image, with detectron2's
    Box2BoxTransform((10, 10, 5, 5)).apply_deltas. Returns (boxes, scores, classes)."""
    x = F.normalize(feats, p=2.0, dim=1)
    bg = x @ predictor["cls_bg_score.weight"].t() if predictor else torch.zeros(len(x), 1)
    scores = F.softmax(torch.cat((x @ F.normalize(concept, p=2.0, dim=1).t(), bg), dim=1) / 0.01, dim=-1)
    boxes = proposals
    if predictor:  # class-agnostic deltas on the raw attention-pool output
        d = feats @ predictor["bbox_pred.weight"].t() + predictor["bbox_pred.bias"]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
        dw, dh = (d[:, 2] / 5).clamp(max=math.log(1000 / 16)), (d[:, 3] / 5).clamp(max=math.log(1000 / 16))
        pcx, pcy, pw, ph = d[:, 0] / 10 * w + cx, d[:, 1] / 10 * h + cy, torch.exp(dw) * w, torch.exp(dh) * h
        boxes = torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)
    if rpn_logits is not None:  # MULTIPLY_RPN_SCORE
        scores = (scores * rpn_logits[:, None]) ** 0.5
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[valid], scores[valid][:, :-1]
    h, w = image_size
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                         boxes[:, 3].clamp(0, h)], 1)
    mask = scores > 0.001
    inds = mask.nonzero()
    boxes, scores = boxes[inds[:, 0]], scores[mask]
    if soft:
        keep, rescored = ref_soft_nms(boxes, scores, inds[:, 1])
        scores[keep] = rescored
    else:
        keep = batched_nms(boxes, scores, inds[:, 1], 0.5)
    keep = keep[:100]
    boxes, scores, classes = boxes[keep], scores[keep], inds[keep, 1]
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # detector_postprocess
    return boxes[nonempty], scores[nonempty], classes[nonempty]


def _same(dets, ref, what):
    boxes, scores, classes = ref
    assert len(dets) == len(boxes) > 10, f"{what}: {len(dets)} detections, RegionCLIP gives {len(boxes)}"
    assert torch.equal(dets.label_ids.cpu(), classes), f"{what}: labels differ"
    torch.testing.assert_close(dets.scores.cpu(), scores, rtol=1e-4, atol=1e-6, msg=lambda m: f"{what} scores:\n{m}")
    torch.testing.assert_close(dets.boxes_xyxy.cpu(), boxes, rtol=1e-4, atol=1e-3, msg=lambda m: f"{what} boxes:\n{m}")


# ------------------------------------------------------------------------------------ tests
def test_finetuned_coco_recipe_is_regionclips_inference(files, coco_model):
    """Box deltas on the raw features, the learned background, /0.01, every pair above 0.001,
    soft-NMS, top 100: the same detections as RegionCLIP's code on the same features."""
    model = coco_model
    assert model.box_head is not None and model.cfg.regions.box_refinement and model.cfg.scoring.soft_nms
    img = shapes_image(120, 160)
    dets = model.detect(img, NAMES, text_embeddings=files["emb"])
    with torch.inference_mode():
        batch = model.batch(model.load([img]))
        boxes, objectness = model.propose(batch)  # no RPN score in this recipe: probabilities
        feats = model.embed(batch, boxes, raw=True)
    assert float(objectness[0].max()) <= 1.0
    predictor = zoo.box_predictor(torch.load(files["finetuned"], weights_only=True)["model"])
    concept = torch.load(files["emb"], weights_only=True)
    want = ref_inference(feats, boxes[0], batch.sizes[0], concept, predictor, soft=True)
    _same(dets, want, "fine-tuned")
    zero_bg = ref_inference(feats, boxes[0], batch.sizes[0], concept,
                            {**predictor, "cls_bg_score.weight": torch.zeros(1, 32)}, soft=True)
    assert not torch.allclose(zero_bg[1][:20], want[1][:20], atol=1e-3), "the background must matter here"


def test_zero_shot_recipe_fuses_the_raw_rpn_logit(files, cc_model):
    model = cc_model
    img = shapes_image(100, 150, seed=2)
    dets = model.detect(img, NAMES, text_embeddings=files["emb"])
    with torch.inference_mode():
        batch = model.batch(model.load([img]))
        boxes, logits = model.propose(batch)  # this recipe multiplies by logits: propose gives them
        _, probs = model.propose(batch, logits=False)
        feats = model.embed(batch, boxes, raw=True)
    torch.testing.assert_close(torch.sigmoid(logits[0]), probs[0])
    assert float(logits[0].min()) < 0 < float(logits[0].max())  # both signs: NaN rows are exercised
    concept = torch.load(files["emb"], weights_only=True)
    _same(dets, ref_inference(feats, boxes[0], batch.sizes[0], concept, rpn_logits=logits[0]), "zero-shot")


def test_rpn_logits_survive_sigmoid_saturation():
    """RegionCLIP multiplies by the logit, and detectron2 ranks proposals by it; a sigmoid is
    exactly 1 in fp32 above ~16.6, which would rank every FPN level's boxes level by level."""
    state = _rpn_state("fpn")
    state["proposal_generator.rpn_head.objectness_logits.bias"] += 25.0
    stage = ProposalStage(zoo.build_rpn_detector("fpn", zoo.convert_rpn(state)[0]),
                          ProposalConfig(num_proposals=100, pre_nms_top_n=1000, min_size=64, max_size=1333)).eval()
    image = _image(48, 72)
    with torch.no_grad():
        (boxes, logits), = stage([image], logits=True)
        ref_boxes, ref_logits = ref_proposals(state, image, "fpn", 64, 1333, 0.7, 1000, 100)
    assert bool((torch.sigmoid(ref_logits) == 1).all()), "the test needs saturated probabilities"
    assert len(boxes) == len(ref_boxes) == 100
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-4)  # the same 100, in the same order
    assert float(box_iou(ref_boxes, boxes).diagonal().min()) > 0.999


def test_own_padding_is_kept_as_detectron2_keeps_it():
    """A 45x68 image resizes to 64x97 and pads to 64x128: detectron2 keeps the anchors of its own
    padding (masking them changed 7 of the top 100 FPN proposals here); a batch of equal-size
    images gives each image's own proposals."""
    state = _rpn_state("fpn")
    stage = ProposalStage(zoo.build_rpn_detector("fpn", zoo.convert_rpn(state)[0]),
                          ProposalConfig(num_proposals=1000, pre_nms_top_n=1000, nms_threshold=0.7,
                                         min_size=64, max_size=1333)).eval()
    a, b = _image(45, 68), _image(45, 68, seed=1)
    with torch.no_grad():
        (boxes, logits), = stage([a], logits=True)
        ref_boxes, ref_logits = ref_proposals(state, a, "fpn", 64, 1333, 0.7, 1000, 1000)
        pair = stage([a, b], logits=True)
        (alone_b, _), = stage([b], logits=True)
    assert len(boxes) == len(ref_boxes)
    top = 100
    iou = box_iou(ref_boxes[:top], boxes[:top])
    differ = int((iou.max(dim=1).values < 0.999).sum())
    assert differ == 0, f"{differ} of the top {top} proposals differ from detectron2's"
    torch.testing.assert_close(logits[:top], ref_logits[:top], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pair[0][0], boxes, rtol=0, atol=1e-3)  # batched convolutions round differently
    torch.testing.assert_close(pair[1][0], alone_b, rtol=0, atol=1e-3)


def test_anchor_scale_keeps_detectron2_anchors():
    detector = zoo.build_rpn_detector("fpn")
    stage = ProposalStage(detector, ProposalConfig(anchor_scale=0.5))
    gen = stage.detector.rpn.anchor_generator
    assert isinstance(gen, zoo.Detectron2AnchorGenerator) and gen.strides == (4, 8, 16, 32, 64)
    assert gen.sizes == ((16.0,), (32.0,), (64.0,), (128.0,), (256.0,))


def test_soft_nms_is_regionclips():
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(300, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 10 + torch.rand(300, 2, generator=g) * 40], 1)
    boxes[5] = boxes[6] = torch.tensor([3.0, 3.0, 3.0, 9.0])  # two empty boxes: IoU 0 in detectron2
    scores, labels = torch.rand(300, generator=g), torch.randint(0, 4, (300,), generator=g)
    keep, rescored = batched_soft_nms(boxes, scores, labels)
    want_keep, want_scores = ref_soft_nms(boxes, scores, labels)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(rescored, want_scores)
    assert len(keep) < 300 and bool((rescored[:-1] >= rescored[1:]).all())
    # Stopping after the first K picks gives exactly the full run's first K (what select_pairs
    # asks for with max_detections): 0.08 s instead of 19 s per image at RegionCLIP's settings.
    for k in (1, 17, len(keep), len(keep) + 5):
        first_keep, first_scores = batched_soft_nms(boxes, scores, labels, max_picks=k)
        assert torch.equal(first_keep, want_keep[:k])
        torch.testing.assert_close(first_scores, want_scores[:k])


def test_text_embeddings_replace_the_text_tower(models, tmp_path):
    model = models("rn", "pool")
    img, labels = shapes_image(), ["red circle", "green square", "blue triangle"]
    emb = model.encode_text(labels)
    want = model.detect(img, labels, score_threshold=0.0)
    # Rows in another order under names the text tower never sees: the rows decide, in their order.
    perm = torch.tensor([2, 0, 1])
    torch.save(emb[perm] * 3.0, tmp_path / "emb.pth")
    for source in (emb[perm] * 3.0, tmp_path / "emb.pth"):  # any row norm; a tensor or a file
        got = model.detect(img, ["x", "y", "z"], score_threshold=0.0, text_embeddings=source)
        assert torch.equal(perm[got.label_ids], want.label_ids) and set(got.names) <= {"x", "y", "z"}
        torch.testing.assert_close(got.scores, want.scores)
    unnamed = model.detect(img, text_embeddings=emb, score_threshold=0.0)
    assert unnamed.vocabulary == ("0", "1", "2") and torch.equal(unnamed.label_ids, want.label_ids)
    boxes = torch.tensor([[0.0, 0.0, 80, 60]])
    torch.testing.assert_close(model.classify([img], labels, [boxes], text_embeddings=emb)[0],
                               model.classify([img], labels, [boxes])[0])
    with pytest.raises(BadInput) as err:
        model.detect(img, labels[:2], text_embeddings=emb)
    assert "3 embeddings but 2 labels" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BadInput) as err:
        model.detect(img, labels, text_embeddings=torch.randn(3, 16))
    assert "dimension 16" in str(err.value) and "embeds to 32" in str(err.value)


def test_regionclip_text_ensemble(cc_model):
    """text.ensemble regionclip: the raw mean of RegionCLIP's 81 prompts per name, then unit rows,
    cached apart from the default ensemble's embeddings."""
    model = cc_model
    labels = ["dog", "hot dog,+bun"]
    before = model.text.prompts_encoded
    got = model.encode_text(labels)
    assert model.text.prompts_encoded - before == 2 * 81
    tokenizer = zoo.clip_tower.open_clip.get_tokenizer(TINY)
    with torch.no_grad():  # extract_concept_features.py: per name, the raw mean of its 81 prompts' features
        raw = torch.stack([model.clip.encode_text(tokenizer(zoo.concepts.regionclip_prompts(lb, zoo.REGIONCLIP_TEMPLATES)))
                           .float().mean(dim=0) for lb in labels])
    torch.testing.assert_close(got, F.normalize(raw, dim=-1), rtol=1e-5, atol=1e-6)


def test_save_keeps_the_box_head_and_background(coco_model, files, tmp_path):
    coco_model.save(tmp_path / "m.pt", box_head=False)
    again = RegionCLIP(config=load_config(ModelConfig, files["coco"], [*SMALL, f"checkpoint={tmp_path / 'm.pt'}"]))
    assert torch.equal(again.background_embedding, coco_model.background_embedding)
    assert torch.equal(again.box_head.bbox_pred.weight, coco_model.box_head.bbox_pred.weight)
    img = shapes_image(96, 128, seed=5)
    a, b = coco_model.detect(img, NAMES), again.detect(img, NAMES)
    assert torch.equal(a.boxes_xyxy, b.boxes_xyxy) and torch.equal(a.scores, b.scores)


def test_presets_are_the_importers_settings():
    """configs/models/regionclip-*.yaml say what `regionclip import` writes, checkpoint aside."""
    for arch, clip in (("rn50", "RN50-quickgelu"), ("rn50x4", "RN50x4-quickgelu")):
        for kind, detector, recipe in (("cc", "detectron2_r50_fpn", "zero-shot"), ("coco", "detectron2_r50_c4", "finetuned-coco")):
            name = f"regionclip-{arch}-{kind}"
            preset = to_dict(load_config(ModelConfig, Path("configs/models") / f"{name}.yaml"))
            want = to_dict(zoo.preset_config(name, clip, detector, Path(f"~/.cache/regionclip/{name}.pt"), recipe))
            assert preset == want, name


def test_missing_pieces_give_one_line_with_the_remedy(tmp_path):
    with pytest.raises(WeightsUnavailable) as err:
        RegionCLIP.from_pretrained("regionclip-rn50-coco", [f"checkpoint={tmp_path / 'none.pt'}"])
    assert "regionclip import" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BadConfig) as err:
        RegionCLIP(clip_model=TINY, clip_pretrained="none", detector="detectron2_r50_fpn", detector_weights="none",
                   device="cpu")
    assert "regionclip import" in str(err.value)
    with pytest.raises(BadConfig) as err:
        tiny_model("rn", "pool", regions={"box_refinement": True})
    assert "no box head" in str(err.value)
    with pytest.raises(BadConfig, match="background"):
        tiny_model("rn", "pool", scoring={"recipe": "regionclip"})


def test_pool_boxes_follow_the_rounded_resize(models):
    enc = models("rn", "pool").regions
    x, scale = enc.resize(torch.rand(3, 48, 70))  # x 16.67: 70 -> 1166.7, rounded to 1167
    assert x.shape[-2:] == (800, 1167) and scale == (1167 / 70, 800 / 48, 1167 / 70, 800 / 48)


def test_import_then_detect_with_the_preset_from_the_command_line(files, tmp_path, capsys, monkeypatch):
    """The issue's 'done when': regionclip detect img.jpg --model regionclip-rn50-coco --labels ..."""
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, err = run(["import", str(files["finetuned"]), str(files["finetuned"]), "--text-from",
                          str(files["pretrained"]), "--name", "regionclip-rn50-coco"], capsys)
    assert code == 0, err
    assert (tmp_path / ".cache/regionclip/regionclip-rn50-coco.pt").is_file() and "finetuned-coco" in out
    img = tmp_path / "img.jpg"
    cv2.imwrite(str(img), cv2.cvtColor(shapes_image(120, 160), cv2.COLOR_RGB2BGR))
    sets = [a for s in SMALL for a in ("--set", s)]
    code, out, err = run(["detect", str(img), "--model", "regionclip-rn50-coco", *sets, "--labels", "dog,cat,hot dog",
                          "--json", str(tmp_path / "a.json")], capsys)
    assert code == 0, err
    assert {r["label"] for r in json.loads((tmp_path / "a.json").read_text())} <= {"dog", "cat", "hot dog"}
    code, out, err = run(["detect", str(img), "--model", "regionclip-rn50-coco", *sets, "--labels-file",
                          str(files["names"]), "--text-embeddings", str(files["emb"]), "--json", str(tmp_path / "b.json")],
                         capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "b.json").read_text())
    assert records and {r["label"] for r in records} <= set(NAMES)

    code, out, err = run(["detect", str(img), "--model", "regionclip-rn50-coco", *sets, "--labels", "dog,cat",
                          "--text-embeddings", str(files["emb"])], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "5 embeddings but 2 labels" in err
    torch.save(torch.randn(5, 16), tmp_path / "small.pth")
    code, out, err = run(["detect", str(img), "--model", "regionclip-rn50-coco", *sets, "--labels-file",
                          str(files["names"]), "--text-embeddings", str(tmp_path / "small.pth")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dimension 16" in err
    code, out, err = run(["import", str(files["rpn_lvis"]), str(files["rpn_lvis"])], capsys)
    assert code == 4 and len(err.strip().splitlines()) == 1 and "expected a RegionCLIP" in err


def test_eval_with_concept_embeddings_keeps_the_recipes_threshold(coco_model, files, tiny_shapes, monkeypatch, capsys):
    from pycocotools.coco import COCO

    from regionclip.eval_dataset import evaluate_model

    gt = COCO(str(tiny_shapes["val_annotations"]))
    names = [c["name"] for c in gt.cats.values()]
    emb = torch.randn(len(names), 32, generator=torch.Generator().manual_seed(1))
    seen = []
    stream = coco_model.predictor.stream
    monkeypatch.setattr(coco_model.predictor, "stream", lambda *a, **k: seen.append(k) or stream(*a, **k))
    report, records = evaluate_model(coco_model, gt, tiny_shapes["val_images"], text_embeddings=emb, workers=0)
    assert report["settings"]["images"] == 4 and records
    assert seen and all(k["score_threshold"] is None for k in seen)  # the preset's 0.001, not 0
    assert all(r["score"] > 0.001 for r in records)
    code, out, err = run(["eval", "--annotations", str(tiny_shapes["val_annotations"]), "--images",
                          str(tiny_shapes["val_images"]), "--model", str(files["coco"]), "--text-embeddings",
                          str(files["emb"])], capsys)
    assert code == 2 and "5 embeddings but 12 labels" in err and len(err.strip().splitlines()) == 1
