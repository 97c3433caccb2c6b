"""Captions of the shapes set, COCO Captions loading and concept matching (CPU, about a second)."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from test_cli import run

from regionclip.concepts import ConceptPool, load_concepts
from regionclip.data import captions_path_for, load_captions, make_shapes
from regionclip.data.shapes import BASE, CATEGORIES, NOVEL, shape_captions
from regionclip.errors import BadAnnotations, BadConfig, BadInput

REPO = Path(__file__).resolve().parents[1]
SEED = 19  # at 64..96 px its 4 train images hold an empty one and some with a repeated category


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return make_shapes(tmp_path_factory.mktemp("captioned"), n_train=4, n_val=1, seed=SEED, image_size=(64, 96))


def _objects_and_captions(paths: dict[str, Path], split: str) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    instances = json.loads(paths[f"{split}_annotations"].read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, list[str]] = {im["id"]: [] for im in instances["images"]}
    for ann in instances["annotations"]:
        objects[ann["image_id"]].append(names[ann["category_id"]])
    captions: dict[int, list[str]] = defaultdict(list)
    captions_file = json.loads(paths[f"{split}_captions"].read_text())
    assert captions_file["images"] == instances["images"]
    assert [a["id"] for a in captions_file["annotations"]] == list(range(1, len(captions_file["annotations"]) + 1))
    for ann in captions_file["annotations"]:
        assert set(ann) == {"id", "image_id", "caption"}
        captions[ann["image_id"]].append(ann["caption"])
    return objects, captions


def _mentions(caption: str, name: str) -> bool:
    return re.search(rf"\b{name}s?\b", caption.lower()) is not None


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --- shapes captions ---------------------------------------------------------------------------


def test_every_caption_names_every_shape_of_its_image_and_no_other(shapes):
    objects, captions = _objects_and_captions(shapes, "train")
    assert any(not names for names in objects.values()), "the seed no longer draws an empty image"
    assert any(max(Counter(names).values(), default=0) > 1 for names in objects.values())
    pool = ConceptPool(CATEGORIES)
    for image_id, names in objects.items():
        assert len(captions[image_id]) == 5 and len(set(captions[image_id])) == 5, captions[image_id]
        for caption in captions[image_id]:
            for name in CATEGORIES:
                assert _mentions(caption, name) == (name in names), (caption, names)
            assert [CATEGORIES[i] for i in pool.match(caption)] == sorted(set(names), key=CATEGORIES.index)
            for name, count in Counter(names).items():
                if count > 1:  # counted in words, with the plural
                    assert f"{['', 'a', 'two', 'three', 'four', 'five', 'six'][count]} {name}s" in caption.lower()


def test_empty_image_captions_name_no_shape():
    captions = shape_captions([], np.random.default_rng(0), 5, "grey")
    assert len(set(captions)) == 5
    for caption in captions:
        assert not re.search(r"circle|square|triangle|red|green|blue|yellow", caption.lower()), caption


def test_captions_leave_images_and_instances_byte_identical(shapes, tmp_path):
    plain = make_shapes(tmp_path, n_train=4, n_val=1, seed=SEED, image_size=(64, 96), captions_per_image=0)
    assert "train_captions" not in plain and not (tmp_path / "annotations" / "captions_train.json").exists()
    for split, n in (("train", 4), ("val", 1)):
        assert plain[f"{split}_annotations"].read_bytes() == shapes[f"{split}_annotations"].read_bytes()
        for i in range(n):
            name = f"{i:06d}.jpg"
            assert (plain[f"{split}_images"] / name).read_bytes() == (shapes[f"{split}_images"] / name).read_bytes()


def test_novel_shapes_are_captioned_too():
    captions = shape_captions(NOVEL + ["red circle", "red circle"], np.random.default_rng(1), 8)
    assert len(set(captions)) == 8
    for caption in captions:
        assert all(_mentions(caption, name) for name in NOVEL) and "two red circles" in caption.lower()


def test_negative_caption_count_is_refused(tmp_path):
    with pytest.raises(BadInput, match="captions_per_image"):
        make_shapes(tmp_path, n_train=1, n_val=0, captions_per_image=-1)


def test_make_shapes_command_prints_the_captions_files(tmp_path, capsys):
    code, out, err = run(["make-shapes", str(tmp_path / "s"), "--train", "1", "--val", "1", "--min-side", "64",
                          "--max-side", "64", "--captions-per-image", "2"], capsys)
    assert code == 0, err
    assert "train captions" in out and "val captions" in out
    captions = load_captions(tmp_path / "s" / "annotations" / "captions_val.json", [1])
    assert len(captions[1]) == 2


# --- load_captions -----------------------------------------------------------------------------


def test_load_captions_reads_every_image_of_the_instances_file(shapes):
    path = captions_path_for(shapes["train_annotations"])
    assert path == shapes["train_captions"]
    ids = [im["id"] for im in json.loads(shapes["train_annotations"].read_text())["images"]]
    captions = load_captions(path, ids)
    assert list(captions) == ids and all(len(c) == 5 for c in captions.values())
    assert load_captions(path) == captions


def test_load_captions_errors_are_one_line(tmp_path):
    with pytest.raises(BadAnnotations) as exc:
        load_captions(tmp_path / "captions_train.json")
    assert "not found" in _one_line(exc) and "regionclip make-shapes" in str(exc.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BadAnnotations) as exc:
        load_captions(bad)
    assert "not valid JSON" in _one_line(exc)
    for data, expected in (({"images": []}, "'annotations'"), ({"annotations": [{"image_id": 1}]}, "'caption'"),
                           ({"annotations": [{"caption": "a cat"}]}, "'image_id'")):
        bad.write_text(json.dumps(data))
        with pytest.raises(BadAnnotations, match=expected) as exc:
            load_captions(bad)
        _one_line(exc)
    good = tmp_path / "captions_val.json"
    good.write_text(json.dumps({"annotations": [{"id": 1, "image_id": 2, "caption": "a cat\n"},
                                                {"id": 2, "image_id": 3, "caption": "  "}]}))
    assert load_captions(good) == {2: ["a cat"]}
    with pytest.raises(BadAnnotations) as exc:
        load_captions(good, [2, 3, 4])
    assert "2 of 3 images have no caption (first: image id 3)" in _one_line(exc)
    with pytest.raises(BadAnnotations, match="instances_") as exc:
        captions_path_for(tmp_path / "train.json")
    _one_line(exc)


# --- concepts ----------------------------------------------------------------------------------


def test_concept_matching_plurals_boundaries_and_separators():
    pool = ConceptPool(["cat", "box", "puppy", "red circle", "circle", "teddy bear", "scar", "potato", "toy"])
    idx = {name: i for i, name in enumerate(pool.names)}

    def found(text: str) -> set[str]:
        return {pool.names[i] for i in pool.match(text)}

    assert found("Two CATS and a Cat") == {"cat"}
    assert found("boxes, puppies, potatoes and toys") == {"box", "puppy", "potato", "toy"}
    assert found("a red circle") == {"red circle", "circle"}  # the shorter concept matches too
    assert found("red circles everywhere") == {"red circle", "circle"}
    assert found("a teddy-bear, two Teddy  bears, a teddy_bear") == {"teddy bear"}
    assert found("concatenate the scarves on a square, she scares") == set()  # no match inside a word
    assert found("a scar; the cat.") == {"scar", "cat"}
    assert found("catbox puppys reds circle") == {"circle"}
    assert found("a red\ncircle") == {"red circle", "circle"}
    assert pool.match("") == [] and pool.match("a cat and a box") == sorted([idx["cat"], idx["box"]])
    assert pool.image_concepts(["a cat", "two boxes", "a cat again"]) == sorted([idx["cat"], idx["box"]])


def test_concept_index_agrees_with_each_expression():
    names = ["bow_(weapon)", "bow-tie", "Dixie_cup", "cup", "r2d2", "St. Bernard", "ice-cream cone", "fish"]
    pool = ConceptPool(names + ["cup", " fish "])
    assert pool.names == names  # duplicates dropped, first kept
    texts = ["Two bows and a bow tie", "dixie cups on a table", "R2D2!", "a st.  bernard", "ice cream cones",
             "fishes", "bowtie", "teacup"]
    for text in texts:
        assert pool.match(text) == [i for i, p in enumerate(pool._patterns) if p.search(text)], text
    assert pool.names[pool.match("Two bows")[0]] == "bow_(weapon)"


def test_concept_pool_refuses_empty_and_blank_names():
    for names, expected in (([], "empty"), (["cat", "  "], "concept 1"), ("cat", "list of phrases")):
        with pytest.raises(BadConfig, match=expected) as exc:
            ConceptPool(names)
        _one_line(exc)


def test_load_concepts_from_each_source(tmp_path, shapes):
    assert load_concepts(["cat", "dog"]).names == ["cat", "dog"]
    text = tmp_path / "concepts.txt"
    text.write_text("# LVIS-like\ncat\n\n  teddy bear  # a comment\ndog\n")
    assert load_concepts(text).names == ["cat", "teddy bear", "dog"]
    assert load_concepts(REPO / "configs" / "splits" / "shapes.yaml").names == BASE + NOVEL
    assert load_concepts(shapes["train_annotations"]).names == CATEGORIES
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"categories": [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}]}))
    assert load_concepts(coco).names == ["cat", "dog"]  # by id, not file order


def test_load_concepts_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    for spec, expected in ((tmp_path / "missing.txt", "not found"), (empty, "empty"), ([], "empty")):
        with pytest.raises(BadConfig, match=expected) as exc:
            load_concepts(spec)
        _one_line(exc)
    bad_split = tmp_path / "split.yaml"
    bad_split.write_text("base: [cat]\nnovle: [dog]\n")
    with pytest.raises(BadConfig, match="unknown key") as exc:
        load_concepts(bad_split)
    _one_line(exc)
