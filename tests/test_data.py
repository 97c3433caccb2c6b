"""Synthetic shapes generator, COCO dataset and split files (CPU, a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO

from regionclip.data import CocoDetection, collate, load_split, make_shapes, render_shapes_image
from regionclip.data.shapes import BASE, CATEGORIES, NOVEL
from regionclip.errors import BadAnnotations, BadConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=3, seed=0)


@pytest.fixture()
def tiny_coco(tmp_path) -> tuple[Path, Path]:
    """Two images, one with a red box, a green crowd box and a degenerate box; one with none."""
    img = np.zeros((40, 60, 3), np.uint8)
    img[10:20, 5:25] = (255, 0, 0)  # the red box, at the left, so a flip moves it right
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(np.full((30, 30, 3), 128, np.uint8)).save(tmp_path / "empty.png")
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 60, "height": 40},
            {"id": 2, "file_name": "empty.png", "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1},
            {"id": 4, "image_id": 1, "category_id": 7, "bbox": [40, 30, 0.5, 5], "area": 2.5, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "red box"}, {"id": 3, "name": "green box"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, tmp_path


# --- generator ---------------------------------------------------------------------------------


def test_same_seed_is_identical_and_another_seed_differs(shapes, tmp_path):
    again = make_shapes(tmp_path / "again", n_train=6, n_val=3, seed=0)
    other = make_shapes(tmp_path / "other", n_train=6, n_val=3, seed=1)
    for key in ("train_annotations", "val_annotations", "split"):
        assert again[key].read_bytes() == shapes[key].read_bytes()
    assert other["train_annotations"].read_bytes() != shapes["train_annotations"].read_bytes()
    for name in ("000000.jpg", "000005.jpg"):
        a = np.asarray(Image.open(shapes["train_images"] / name))
        b = np.asarray(Image.open(again["train_images"] / name))
        np.testing.assert_array_equal(a, b)
    a = np.asarray(Image.open(shapes["train_images"] / "000000.jpg"))
    c = np.asarray(Image.open(other["train_images"] / "000000.jpg"))
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_image_i_does_not_depend_on_the_count(shapes, tmp_path):
    fewer = make_shapes(tmp_path / "fewer", n_train=2, n_val=0, seed=0)
    for name in ("000000.jpg", "000001.jpg"):
        assert (fewer["train_images"] / name).read_bytes() == (shapes["train_images"] / name).read_bytes()


def test_coco_json_is_valid_and_boxes_lie_inside_images(shapes):
    for split, n in (("train", 6), ("val", 3)):
        coco = COCO(str(shapes[f"{split}_annotations"]))
        assert len(coco.imgs) == n
        assert [coco.cats[i]["name"] for i in range(1, 13)] == CATEGORIES
        for ann in coco.dataset["annotations"]:
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0 and ann["area"] > 0
            assert 1 <= ann["category_id"] <= 12
            assert x >= 0 and y >= 0 and w >= 8 and h >= 8
            assert x + w <= img["width"] and y + h <= img["height"]
        for img in coco.dataset["images"]:
            with Image.open(shapes[f"{split}_images"] / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
                assert 256 <= im.width <= 512 and 256 <= im.height <= 512


def test_split_file_and_shipped_copy(shapes):
    split = load_split(shapes["split"])
    assert split["novel"] == ["red triangle", "green circle", "blue square"] == NOVEL
    assert split["base"] == BASE and len(split["base"]) == 9
    assert set(split["base"]) | set(split["novel"]) == set(CATEGORIES)
    assert load_split(REPO / "configs" / "splits" / "shapes.yaml") == split


def test_render_shapes_image_boxes_cover_their_colour():
    rgb, objects = render_shapes_image(np.random.default_rng(3), (200, 300), empty_prob=0.0)
    assert rgb.shape == (200, 300, 3) and rgb.dtype == np.uint8
    assert 1 <= len(objects) <= 6
    for (x1, y1, x2, y2), name in objects:
        assert name in CATEGORIES
        assert 0 <= x1 < x2 <= 300 and 0 <= y1 < y2 <= 200


def test_alt_style_is_another_world_with_its_own_split(tmp_path):
    """The held-out style: no name of the default world, its own 3 novel names, reproducible,
    and about half its objects novel (the share of unlabelled objects in training)."""
    from regionclip.data.shapes import STYLES

    alt = make_shapes(tmp_path / "a", n_train=30, n_val=2, seed=0, image_size=(96, 128), style="alt")
    again = make_shapes(tmp_path / "b", n_train=30, n_val=2, seed=0, image_size=(96, 128), style="alt")
    assert again["train_annotations"].read_bytes() == alt["train_annotations"].read_bytes()
    data = json.loads(alt["train_annotations"].read_text())
    names = [c["name"] for c in data["categories"]]
    assert names == STYLES["alt"].categories and not set(names) & set(CATEGORIES) and len(names) == 12
    split = load_split(alt["split"])
    assert split["novel"] == ["orange star", "purple hexagon", "cyan cross"] and len(split["base"]) == 9
    novel_ids = {c["id"] for c in data["categories"] if c["name"] in split["novel"]}
    share = np.mean([a["category_id"] in novel_ids for a in data["annotations"]])
    assert 0.35 <= share <= 0.65, share
    assert data["info"]["style"] == "alt"



@pytest.mark.parametrize("style", ["shapes", "alt"])
def test_others_are_none_of_the_categories_and_change_nothing_else(style):
    """make-shapes --others: objects of other shapes and colours, named "other", drawn after the
    rest; every other object, box and pixel is the one the image has without them."""
    from regionclip.data.shapes import OTHER_NAME, STYLES

    seen = 0
    for i in range(6):
        plain_rgb, plain = render_shapes_image(np.random.default_rng([5, i]), (160, 200), style=style)
        rgb, objects = render_shapes_image(np.random.default_rng([5, i]), (160, 200), style=style, others=3)
        assert objects[:len(plain)] == plain and all(name == OTHER_NAME for _, name in objects[len(plain):])
        changed = np.zeros(rgb.shape[:2], bool)
        for (x1, y1, x2, y2), _ in objects[len(plain):]:
            changed[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = True  # anti-aliasing spills a pixel
        assert (rgb[~changed] == plain_rgb[~changed]).all()
        seen += len(objects) - len(plain)
    assert seen >= 3
    assert OTHER_NAME not in STYLES[style].categories


def test_others_are_annotated_as_their_own_category_and_never_captioned(tmp_path):
    plain = make_shapes(tmp_path / "a", n_train=0, n_val=6, seed=2, image_size=(128, 160))
    more = make_shapes(tmp_path / "b", n_train=0, n_val=6, seed=2, image_size=(128, 160), others=2)
    a, b = (json.loads(p["val_annotations"].read_text()) for p in (plain, more))
    assert [c["name"] for c in b["categories"]] == CATEGORIES + ["other"] and b["info"]["others"] == 2
    other = len(CATEGORIES) + 1
    key = lambda ann: (ann["image_id"], ann["category_id"], ann["bbox"])  # noqa: E731
    assert sorted(map(key, a["annotations"])) == sorted(key(x) for x in b["annotations"] if x["category_id"] != other)
    assert any(x["category_id"] == other for x in b["annotations"])
    assert plain["val_captions"].read_text() == more["val_captions"].read_text()
    # Training reads them as hard negatives: label -1 beside the kept categories' labels.
    data = CocoDetection(more["val_annotations"], more["val_images"], BASE, negatives=["other"])
    labels = torch.cat([data[i][1]["labels"] for i in range(len(data))])
    assert (labels == -1).any() and labels.max() < len(BASE) and set(labels.tolist()) <= set(range(-1, len(BASE)))
    with pytest.raises(BadConfig, match="negative category 'others' is not in"):
        CocoDetection(more["val_annotations"], more["val_images"], BASE, negatives=["others"])
    with pytest.raises(BadConfig, match="'red circle' is both a category and a negative category"):
        CocoDetection(more["val_annotations"], more["val_images"], BASE, negatives=["red circle"])

def test_unknown_style_is_refused_before_drawing(tmp_path):
    from regionclip.errors import BadInput

    with pytest.raises(BadInput, match="unknown shapes style 'moon'.*shapes, alt"):
        make_shapes(tmp_path / "x", n_train=1, n_val=0, style="moon")
    assert not (tmp_path / "x").exists()


def test_render_can_draw_an_empty_image():
    rgb, objects = render_shapes_image(np.random.default_rng(0), 96, empty_prob=1.0)
    assert rgb.shape == (96, 96, 3) and objects == []


def test_progress_callback_counts_every_image(tmp_path):
    seen: list[int] = []
    make_shapes(tmp_path, n_train=2, n_val=1, progress=seen.append)
    assert seen == [1, 2, 3]


# --- CocoDetection -----------------------------------------------------------------------------


def test_dataset_shapes_and_labels(shapes):
    ds = CocoDetection(shapes["train_annotations"], shapes["train_images"])
    coco = ds.coco
    assert len(ds) == 6 and ds.category_names == CATEGORIES
    for i in range(len(ds)):
        image, target = ds[i]
        h, w = target["orig_size"]
        # uint8: a quarter of float32's bytes through the loader; data.to_float makes [0, 1] on the device.
        assert image.dtype == torch.uint8 and image.shape == (3, h, w)
        n = len(coco.getAnnIds(imgIds=target["image_id"]))
        assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (n,) and target["labels"].dtype == torch.int64
        names = sorted(ds.category_names[k] for k in target["labels"].tolist())
        expected = sorted(coco.cats[a["category_id"]]["name"] for a in coco.loadAnns(coco.getAnnIds(imgIds=target["image_id"])))
        assert names == expected


def test_max_side_resizes_image_and_scales_boxes(shapes):
    full = CocoDetection(shapes["train_annotations"], shapes["train_images"])
    small = CocoDetection(shapes["train_annotations"], shapes["train_images"], max_side=128)
    image_f, target_f = full[0]
    image_s, target_s = small[0]
    h, w = target_f["orig_size"]
    assert target_s["orig_size"] == (h, w)
    assert max(image_s.shape[-2:]) == 128
    sy, sx = image_s.shape[-2] / h, image_s.shape[-1] / w
    expected = target_f["boxes"] * torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(target_s["boxes"], expected)


def test_hflip_moves_boxes_with_the_pixels(tiny_coco):
    path, images = tiny_coco
    plain = CocoDetection(path, images, categories=["red box"])
    flipped = CocoDetection(path, images, categories=["red box"], train=True, hflip_prob=1.0)
    image, target = plain[0]
    image_f, target_f = flipped[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 10.0, 25.0, 20.0]]))
    torch.testing.assert_close(target_f["boxes"], torch.tensor([[35.0, 10.0, 55.0, 20.0]]))
    torch.testing.assert_close(image_f, image.flip(-1))
    x1, y1, x2, y2 = (int(v) for v in target_f["boxes"][0])
    assert float(image_f[0, y1:y2, x1:x2].float().mean()) == pytest.approx(255.0)  # the red is inside the box
    # Flipping is a training augmentation only.
    unflipped = CocoDetection(path, images, categories=["red box"], train=False, hflip_prob=1.0)[0][1]["boxes"]
    torch.testing.assert_close(unflipped, target["boxes"])


def test_crowd_and_degenerate_boxes_are_skipped_and_empty_image_is_kept(tiny_coco):
    path, images = tiny_coco
    ds = CocoDetection(path, images)
    assert ds.category_names == ["green box", "red box"]  # ordered by COCO id
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 0]  # one red, one green; crowd and 0.5 px wide gone
    image, empty = ds[1]
    assert image.shape == (3, 30, 30)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_boxes_left_under_a_pixel_by_clipping_or_resizing_are_dropped_and_counted(tiny_coco):
    """Real COCO has boxes partly or wholly outside their image: checked only in the file, they
    became zero-wide after clipping and the box regression targets went infinite."""
    path, images = tiny_coco
    data = json.loads(path.read_text())
    data["annotations"] += [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [59.5, 10, 10, 10], "iscrowd": 0},  # 0.5 px inside
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [70, 10, 10, 10], "iscrowd": 0},  # wholly outside
        {"id": 12, "image_id": 1, "category_id": 7, "bbox": [0, 0, 3, 1.5], "iscrowd": 0},  # 0.75 px high at half size
    ]
    path.write_text(json.dumps(data))
    _, target = CocoDetection(path, images)[0]
    assert target["labels"].tolist() == [1, 0, 1] and target["dropped"] == 2, target
    _, small = CocoDetection(path, images, max_side=30)[0]
    assert small["labels"].tolist() == [1, 0] and small["dropped"] == 3, small
    for t in (target, small):
        wh = t["boxes"][:, 2:] - t["boxes"][:, :2]
        assert bool((wh >= 1).all()) and type(t["boxes"]) is torch.Tensor, t["boxes"]


def test_category_subset_drops_other_annotations(shapes):
    ds = CocoDetection(shapes["train_annotations"], shapes["train_images"], categories=NOVEL)
    assert ds.category_names == NOVEL
    novel_ids = {CATEGORIES.index(n) + 1 for n in NOVEL}
    total = sum(len(ds[i][1]["labels"]) for i in range(len(ds)))
    assert total == sum(a["category_id"] in novel_ids for a in ds.coco.dataset["annotations"])
    assert len(ds) == 6  # images without novel objects stay, as negatives


def test_unknown_category_names_the_closest_match(shapes):
    with pytest.raises(BadConfig, match="red triangel.*red triangle"):
        CocoDetection(shapes["train_annotations"], shapes["train_images"], categories=["red triangel"])


def test_missing_or_malformed_annotation_file(tmp_path):
    with pytest.raises(BadAnnotations, match="not found"):
        CocoDetection(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BadAnnotations, match="not valid JSON"):
        CocoDetection(bad, tmp_path)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(BadAnnotations, match="annotations"):
        CocoDetection(bad, tmp_path)


def test_collate_keeps_per_image_lists(shapes):
    ds = CocoDetection(shapes["val_annotations"], shapes["val_images"])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert all(img.ndim == 3 for img in images) and all("boxes" in t for t in targets)
    assert [t["image_id"] for t in targets] == ds.ids


# --- split files -------------------------------------------------------------------------------


def test_load_split_json_and_errors(tmp_path):
    good = tmp_path / "split.json"
    good.write_text(json.dumps({"base": ["a", "b", "a"], "novel": ["c"]}))
    assert load_split(good) == {"base": ["a", "b"], "novel": ["c"]}
    with pytest.raises(BadAnnotations, match="not found"):
        load_split(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    for content in ("base: [a]\n", "- a\n- b\n", "base: [a]\nnovel: [a]\n", "base: [a]\nnovel: [b]\nextra: []\n", "base: [a\n"):
        bad.write_text(content)
        with pytest.raises(BadAnnotations):
            load_split(bad)
    bad.write_text(yaml.safe_dump({"base": [1, 2], "novel": []}))
    with pytest.raises(BadAnnotations, match="list of category names"):
        load_split(bad)
