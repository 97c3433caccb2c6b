"""The vocabulary file: format, bad input (one line, before any model), the combination rule,
compiling with a tiny model, negatives and per-class thresholds in scoring, the exemplar cache,
and the CLI's --vocab / --exemplar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shapes_image, tiny_model
from test_cli import TINY, run

from regionclip.config import ScoringConfig
from regionclip.errors import BadInput
from regionclip.exemplars import VocabRules, combine
from regionclip.scoring import select, select_pairs
from regionclip.vocabulary import EXEMPLAR_WEIGHT, Exemplar, Vocabulary

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return tiny_model("vit", "crop")


@pytest.fixture
def ref(tmp_path) -> Path:
    """A 160x120 reference image in tmp_path/ref/."""
    (tmp_path / "ref").mkdir()
    p = tmp_path / "ref" / "a.png"
    cv2.imwrite(str(p), cv2.cvtColor(shapes_image(120, 160, seed=3), cv2.COLOR_RGB2BGR))
    return p


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "labels.yaml"
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------ format
def test_file_format_reads_prompts_exemplars_negatives_thresholds(tmp_path, ref):
    v = Vocabulary.from_yaml(_yaml(tmp_path, """
dog: {prompts: ["dog", "puppy"], threshold: 0.3}
fire hydrant: {exemplars: ["ref/a.png:120,40,150,100"], negatives: ["red post box"]}
cat: {}
"""))
    assert v.names == ["dog", "fire hydrant", "cat"]
    assert v.negatives == ["red post box"]
    assert v.thresholds == [0.3, None, None]
    dog, hydrant, cat = v.classes
    assert dog.text_prompts == ("dog", "puppy")
    assert hydrant.text_prompts == ()  # exemplars only: the name is not embedded as text
    assert hydrant.exemplars[0].image == tmp_path / "ref" / "a.png"  # relative to the YAML's folder
    assert hydrant.exemplars[0].box_xyxy == (120, 40, 150, 100)
    assert cat.text_prompts == ("cat",)
    manifest = json.loads(json.dumps(v.to_manifest()))
    assert manifest["classes"]["dog"] == {"prompts": ["dog", "puppy"], "threshold": 0.3}
    assert manifest["exemplar_weight"] == EXEMPLAR_WEIGHT
    assert Vocabulary.from_dict(v.to_yaml_dict()) == v  # a written file reads back the same


def test_resolve_adds_exemplars_to_labels_and_makes_exemplar_only_classes(ref):
    v = Vocabulary.resolve(labels=["dog", "cat"], exemplars=[f"cat={ref}:1,2,30,40", f"hydrant={ref}:5,5,20,20"])
    assert v.names == ["dog", "cat", "hydrant"]
    assert v.classes[1].text_prompts == ("cat",) and len(v.classes[1].exemplars) == 1
    assert v.classes[2].text_prompts == () and v.classes[2].exemplars[0].box_xyxy == (5, 5, 20, 20)
    emb = torch.randn(32)
    w = Vocabulary.resolve(exemplars={"x": [(str(ref), (0, 0, 10, 10)), emb]})
    assert w.classes[0].exemplars[1].embedding.shape == (32,)
    assert Vocabulary.resolve() is None
    names = ref.parent / "names.txt"
    names.write_text("dog\ncat\n")
    assert Vocabulary.resolve(labels_file=names).names == ["dog", "cat"]
    with pytest.raises(BadInput, match="give one of"):
        Vocabulary.resolve(labels=["dog"], vocab={"cat": {}})
    assert Vocabulary.from_labels(["a", "b"]).is_plain


@pytest.mark.parametrize("text, message", [
    ("hydrant: {exemplars: ['ref/a.png:100,40,170,100']}", "outside the 160x120 image"),
    ("hydrant: {exemplars: ['ref/nope.png:1,1,5,5']}", "exemplar image not found"),
    ("hydrant: {exemplars: ['ref/a.png:10,10,10,30']}", "is empty"),
    ("hydrant: {exemplars: ['ref/a.png']}", "write IMAGE:x1,y1,x2,y2"),
    ("'': {}", "a class needs a name"),
    ("dog: {prompt: [puppy]}", "unknown key 'prompt' (did you mean 'prompts'?)"),
    ("dog: {}\ncat: {negatives: [dog]}", "negative 'dog' is also a class"),
    ("dog: {threshold: 2}", "threshold must be in [0, 1]"),
    ("- dog\n- cat", "expected a mapping"),
])
def test_each_bad_input_is_one_line(tmp_path, ref, text, message):
    with pytest.raises(BadInput) as err:
        Vocabulary.from_yaml(_yaml(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_vocabulary_fails_in_the_cli_before_any_model_loads(tmp_path, ref, capsys, monkeypatch):
    import regionclip.model

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(regionclip.model.RegionCLIPModel, "__init__", no_model)
    bad = _yaml(tmp_path, "hydrant: {exemplars: ['ref/a.png:100,40,170,100']}")
    code, _, err = run(["detect", str(ref), "--vocab", str(bad), *TINY], capsys)
    assert code == 2 and "outside the 160x120 image" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["eval", "--annotations", str(tmp_path / "x.json"), "--images", str(tmp_path),
                        "--exemplar", f"dog={ref}:5,5,5,9", *TINY], capsys)
    assert code == 2 and "is empty" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- combination
def test_combination_rule_normalises_each_side_then_weighs_them():
    t = torch.tensor([[3.0, 0, 0], [0, 3.0, 0]])  # two prompts, not unit
    e = torch.tensor([[0, 0, 5.0]])
    text = F.normalize(torch.tensor([1.0, 1.0, 0]), dim=0)
    both = combine(t, e)
    expected = F.normalize((1 - EXEMPLAR_WEIGHT) * text + EXEMPLAR_WEIGHT * torch.tensor([0, 0, 1.0]), dim=0)
    torch.testing.assert_close(both, expected)
    torch.testing.assert_close(combine(t, None), text)
    torch.testing.assert_close(combine(None, e), torch.tensor([0, 0, 1.0]))
    torch.testing.assert_close(combine(t, e, weight=1.0), torch.tensor([0, 0, 1.0]))
    with pytest.raises(BadInput):
        combine(None, torch.zeros(0, 3))


def test_compile_embeds_exemplars_with_the_region_encoder(model, ref):
    box = (30.0, 20.0, 90.0, 70.0)
    v = Vocabulary.from_dict({"dog": {"prompts": ["dog", "puppy"]}, "thing": {"exemplars": [f"{ref}:30,20,90,70"]},
                              "both": {"exemplars": [f"{ref}:30,20,90,70"]}, "cat": {"negatives": ["cow"]}})
    v = Vocabulary.resolve(vocab=v, exemplars={"both": [torch.ones(32)]})
    c = model.predictor.compile(v)
    region = model.encode_regions(str(ref), [box])[0].float()
    text = model.encode_text(["dog", "puppy", "cat", "cow"])
    assert c.names == ["dog", "thing", "both", "cat"] and c.negatives == ["cow"]
    assert c.embeddings.shape == (5, 32)
    torch.testing.assert_close(c.embeddings[0], combine(text[:2], None))
    torch.testing.assert_close(c.embeddings[1], F.normalize(region, dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.embeddings[2], combine(None, torch.stack([region, torch.ones(32)])), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.embeddings[3], text[2])
    torch.testing.assert_close(c.embeddings[4], text[3])  # negatives after the classes
    assert c.rules == VocabRules(1, (None, None, None, None))
    # Exemplars of several images embed in one call, each as it does alone.
    other = np.ascontiguousarray(shapes_image(120, 160, seed=9))
    both = model.predictor.backend.embed_exemplar_images([(str(ref), [box]), (other, [box, (0, 0, 50, 40)])])
    torch.testing.assert_close(both[0][0], region, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], model.encode_regions(other, [box, (0, 0, 50, 40)]).float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- scoring
def test_select_drops_boxes_whose_best_match_is_a_negative_and_uses_class_thresholds():
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70.0]])
    probs = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.3, 0.5], [0.1, 0.45, 0.45], [0.05, 0.35, 0.6]])
    cfg = ScoringConfig(score_threshold=0.2, top_k=2)
    rules = VocabRules(num_negatives=1, thresholds=(None, 0.4))
    d = select(boxes, probs, cfg, ["a", "b"], rules=rules)
    # box 1 and 3: the negative is best -> gone; box 0: a 0.6 kept, b 0.1 under its 0.4;
    # box 2: argmax is the first maximum (b, 0.45 >= 0.4), a 0.1 under the global 0.2.
    got = sorted(zip(d.boxes_xyxy[:, 0].tolist(), d.label_ids.tolist(), d.scores.tolist()))
    assert got == [(0.0, 0, pytest.approx(0.6)), (40.0, 1, pytest.approx(0.45))]
    assert d.vocabulary == ("a", "b")
    given = select(boxes, probs, cfg, ["a", "b"], filter_boxes=False, rules=rules)
    assert len(given) == 8 and int(given.label_ids.max()) == 1  # given boxes stay, negatives' columns go
    pairs = select_pairs(boxes, probs, ScoringConfig(score_threshold=0.2), ["a", "b"], rules)
    assert sorted(zip(pairs.boxes_xyxy[:, 0].tolist(), pairs.label_ids.tolist())) == [(0.0, 0), (40.0, 1)]


def _dets(d):
    return sorted((tuple(round(v, 3) for v in b), lb, round(s, 5))
                  for b, lb, s in zip(d.boxes_xyxy.tolist(), d.names, d.scores.tolist()))


def test_detect_with_negatives_is_plain_detection_without_the_boxes_a_negative_wins(model, image):
    kw = dict(score_threshold=0.0, top_k=1, max_detections=1000)
    plain = model.detect(image, ["red circle", "green square", "blue triangle"], **kw)
    vocab = model.detect(image, vocab={"red circle": {}, "green square": {"negatives": ["blue triangle"]}}, **kw)
    assert "blue triangle" in plain.names  # the test means something
    assert _dets(vocab) == [x for x in _dets(plain) if x[1] != "blue triangle"]
    assert vocab.vocabulary == ("red circle", "green square")


def test_class_thresholds_replace_the_global_one(model, image):
    labels = ["red circle", "green square"]
    kw = dict(top_k=1, max_detections=10_000, score_threshold=0.1)
    plain = model.detect(image, labels, **kw)
    green = plain.label_ids == 1
    cut = float(plain.scores[green].median())
    got = model.detect(image, vocab={"red circle": {}, "green square": {"threshold": cut}}, **kw)
    want = plain[~green | (plain.scores >= cut)]
    assert 0 < int((want.label_ids == 1).sum()) < int(green.sum())  # the test means something
    assert _dets(got) == _dets(want)


def test_a_plain_vocabulary_detects_as_plain_labels(model, image):
    labels = ["red circle", "green square"]
    assert _dets(model.detect(image, Vocabulary.from_labels(labels))) == _dets(model.detect(image, labels))


def test_exemplar_cache_on_disk_is_keyed_by_the_weights(tmp_path, ref, monkeypatch):
    from regionclip.backend import TorchBackend

    calls = []
    original = TorchBackend.embed_exemplar_images
    monkeypatch.setattr(TorchBackend, "embed_exemplar_images", lambda self, *a: calls.append(1) or original(self, *a))
    from regionclip.predictor import Predictor

    v = Vocabulary.resolve(exemplars=[f"x={ref}:30,20,90,70"])
    m = tiny_model("vit", "crop", text={"cache_dir": str(tmp_path / "cache")})
    first = Predictor(TorchBackend(m)).compile(v)
    again = Predictor(TorchBackend(m)).compile(v)  # a fresh backend: nothing in memory, read from disk
    assert len(calls) == 1 and torch.equal(first.embeddings, again.embeddings)
    # Other (random) weights are another key: computed anew, into a file of their own.
    other = tiny_model("vit", "crop", seed=1, text={"cache_dir": str(tmp_path / "cache")}).predictor.compile(v)
    assert len(calls) == 2 and not torch.equal(first.embeddings, other.embeddings)
    assert len(list((tmp_path / "cache").glob("exemplars-*.pt"))) == 2
    cv2.imwrite(str(ref), cv2.cvtColor(shapes_image(120, 160, seed=4), cv2.COLOR_RGB2BGR))
    Predictor(TorchBackend(m)).compile(v)  # the image changed: its content is the key
    assert len(calls) == 3


def test_exemplar_cache_on_disk_keeps_region_modes_and_precisions_apart(tmp_path, ref):
    """One weights file (the demo's), one cache folder: a pool-mode or bf16 run gets its own
    embedding, not the one a crop-mode fp32 run stored (the key once held only the weights and
    the region settings: the pool model got the crop embedding)."""
    from regionclip import RegionCLIP

    v = Vocabulary.resolve(exemplars=[f"x={ref}:30,20,90,70"])
    cached = [f"text.cache_dir={tmp_path / 'cache'}"]

    def compiled(overrides):
        return RegionCLIP.from_pretrained("demo", overrides).predictor.compile(v).embeddings

    crop = compiled(cached)
    for setting in ("mode=pool", "precision=bf16"):
        # A key that left the setting out would hand back the crop embedding from the folder.
        assert not torch.allclose(compiled([*cached, setting]), crop, atol=1e-3), setting
    assert len(list((tmp_path / "cache").glob("exemplars-*.pt"))) == 3


# -------------------------------------------------------------------------------------- CLI
def test_detect_and_eval_take_vocab_and_exemplars(tiny_shapes, tmp_path, capsys):
    ann = tiny_shapes["val_annotations"]
    out = tmp_path / "vocab.yaml"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_exemplar_vocab.py"), "--annotations",
                    str(tiny_shapes["train_annotations"]), "--images", str(tiny_shapes["train_images"]),
                    "--out", str(out)], check=True, capture_output=True)
    v = Vocabulary.from_yaml(out)
    train = json.loads(Path(tiny_shapes["train_annotations"]).read_text())
    first = min((a for a in train["annotations"] if a["category_id"] == train["categories"][0]["id"]),
                key=lambda a: a["id"])
    x, y, w, h = first["bbox"]
    assert v.classes[0].exemplars[0].box_xyxy == (x, y, x + w, y + h) and not v.classes[0].prompts
    report = tmp_path / "r.json"
    code, _, err = run(["eval", "--annotations", str(ann), "--images", str(tiny_shapes["val_images"]),
                        "--vocab", str(out), "--top-k", "1", "--json", str(report), *TINY], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["vocabulary"]["classes"].keys() == set(v.names)
    img = next(Path(tiny_shapes["val_images"]).iterdir())
    js = tmp_path / "d.json"
    code, _, err = run(["detect", str(img), "--labels", "circle", "--exemplar", f"thing={img}:2,2,30,30",
                        "--score-threshold", "0", "--json", str(js), *TINY], capsys)
    assert code == 0, err
    assert {r["label"] for r in json.loads(js.read_text())} <= {"circle", "thing"}
