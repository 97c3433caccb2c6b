"""evaluate / eval_protocols: figures equal pycocotools' own, hand-checked GT-box accuracy, typed errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionclip.data.splits import load_split
from regionclip.errors import BadAnnotations, BadInput
from regionclip.eval_protocols import gt_box_accuracy, gt_box_records, gt_boxes
from regionclip.evaluate import (
    check_results,
    coco_map,
    load_ground_truth,
    split_category_ids,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
# Non-contiguous ids, as in COCO; "zebra" has no ground truth, so its AP is undefined.
CATEGORIES = {1: "car", 2: "dog", 5: "cat", 7: "kite", 9: "zebra"}
SPLIT = {"base": ["car", "dog"], "novel": ["cat", "kite", "zebra"]}
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _coco_dict(images: list[tuple[int, int]], boxes: list[tuple[int, int, list[float]]], cats: dict):
    return {
        "images": [{"id": i + 1, "width": w, "height": h, "file_name": f"{i}.png"}
                   for i, (w, h) in enumerate(images)],
        "annotations": [
            {"id": j + 1, "image_id": img, "category_id": cat, "bbox": bbox,
             "area": bbox[2] * bbox[3], "iscrowd": 0}
            for j, (img, cat, bbox) in enumerate(boxes)
        ],
        "categories": [{"id": i, "name": n} for i, n in cats.items()],
    }


@pytest.fixture
def gt_path(tmp_path) -> Path:
    """5 images of boxes small (< 32²), medium and large; no ground truth for zebra."""
    rng = np.random.default_rng(0)
    boxes = []
    for img in range(1, 6):
        for _ in range(4):
            cat = int(rng.choice([1, 2, 5, 7]))
            side = float(rng.choice([20.0, 60.0, 150.0]))
            x, y = rng.uniform(0, 400, size=2).round(1)
            boxes.append((img, cat, [float(x), float(y), side, side * float(rng.uniform(0.7, 1.3))]))
    return _write(tmp_path / "gt.json", _coco_dict([(640, 480)] * 5, boxes, CATEGORIES))


def _results(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered true boxes (some dropped, some mislabelled) and random false positives.

    Kite boxes are exact, all found and never predicted anywhere else, so kite's AP is 100.
    """
    rng = np.random.default_rng(seed)
    records = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        cat = ann["category_id"]
        if cat == 7:
            records.append({"image_id": ann["image_id"], "category_id": 7, "bbox": [x, y, w, h],
                            "score": 0.99})
            continue
        if rng.uniform() < 0.15:
            continue
        if rng.uniform() < 0.15:
            cat = int(rng.choice([1, 2, 5]))
        jitter = rng.normal(0, 0.08, size=4) * [w, h, w, h]
        records.append({"image_id": ann["image_id"], "category_id": cat,
                        "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                        "score": float(rng.uniform(0.2, 1.0)), "note": "ignored"})  # extra keys are dropped
    for _ in range(15):
        records.append({"image_id": int(rng.integers(1, 6)), "category_id": int(rng.choice([1, 2, 5, 9])),
                        "bbox": [*rng.uniform(0, 400, size=2), *rng.uniform(10, 150, size=2)],
                        "score": float(rng.uniform(0.0, 0.6))})
    return records


def _pycocotools_stats(gt_file: Path, records: list[dict], cat_ids: list[int] | None = None):
    """pycocotools' own summarize() figures, in percent (-1 where undefined)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in records]), iouType="bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, (float(s) * 100 for s in ev.stats[:6])))


def _assert_matches(ours: dict, theirs: dict) -> None:
    for name in STAT_NAMES:
        if theirs[name] < 0:
            assert ours[name] is None, f"{name}: expected None, got {ours[name]}"
        else:
            assert ours[name] == pytest.approx(theirs[name], abs=1e-3), f"{name}: {ours} vs {theirs}"


def test_coco_map_equals_pycocotools(gt_path):
    gt = load_ground_truth(gt_path)
    records = _results(json.loads(gt_path.read_text()))
    report = coco_map(gt, records, SPLIT)

    _assert_matches(report["overall"], _pycocotools_stats(gt_path, records))
    ids = split_category_ids(gt, SPLIT)
    assert ids == {"base": [1, 2], "novel": [5, 7, 9]}
    for part in ("base", "novel"):
        _assert_matches(report[part], _pycocotools_stats(gt_path, records, ids[part]))
    assert 0 < report["overall"]["AP"] < 100, report["overall"]

    per_cat = report["per_category"]
    assert set(per_cat) == set(CATEGORIES.values())
    assert per_cat["kite"] == pytest.approx(100.0)
    assert per_cat["zebra"] is None  # no ground truth: null, not NaN
    # Every category with ground truth has T*R defined entries, so the mean of means is AP.
    defined = [v for v in per_cat.values() if v is not None]
    assert sum(defined) / len(defined) == pytest.approx(report["overall"]["AP"], abs=1e-6)

    # Without a split: no base/novel, same overall figures.
    plain = coco_map(gt, records)
    assert set(plain) == {"overall", "per_category"} and plain["overall"] == report["overall"]


def test_empty_results_give_zeros(gt_path):
    report = coco_map(load_ground_truth(gt_path), [], SPLIT)
    for part in ("overall", "base", "novel"):
        assert all(v == 0 for v in report[part].values()), report[part]
    assert report["per_category"] == {"car": 0, "dog": 0, "cat": 0, "kite": 0, "zebra": None}


def test_check_results_cleans_records(gt_path):
    gt = load_ground_truth(gt_path)
    clean = check_results(gt, [{"image_id": 1, "category_id": 2, "bbox": (1, 2, 3, 4),
                                "score": np.float32(0.5), "label": "dog"}])
    assert clean == [{"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    assert check_results(gt, []) == []


@pytest.mark.parametrize(
    "records, words",
    [
        ([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}] * 2,
         ["2 results", "image ids", "999"]),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
          {"image_id": 1, "category_id": 42, "bbox": [0, 0, 5, 5], "score": 0.5}],
         ["1 results", "category ids", "42", "category_ids="]),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5}], ["record 0", "bbox"]),
        ([{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}], ["record 0", "category_id"]),
    ],
)
def test_bad_results_raise(gt_path, records, words):
    with pytest.raises(BadAnnotations) as info:
        coco_map(load_ground_truth(gt_path), records)
    for word in words:
        assert word in str(info.value)


def test_bad_ground_truth_raises(tmp_path):
    with pytest.raises(BadAnnotations, match="does not exist"):
        load_ground_truth(tmp_path / "missing.json")
    (tmp_path / "a.json").write_text("{oops")
    with pytest.raises(BadAnnotations, match="not JSON"):
        load_ground_truth(tmp_path / "a.json")
    with pytest.raises(BadAnnotations, match="not a COCO annotation file: missing 'annotations', 'categories'"):
        load_ground_truth(_write(tmp_path / "b.json", {"images": []}))
    with pytest.raises(BadAnnotations, match="not a COCO annotation file"):
        load_ground_truth(_write(tmp_path / "c.json", [1, 2]))


def test_ground_truth_defaults_and_silence(tmp_path, capsys):
    data = _coco_dict([(50, 50)], [(1, 1, [1.0, 2.0, 10.0, 4.0])], {1: "car"})
    del data["annotations"][0]["area"], data["annotations"][0]["iscrowd"]
    gt = load_ground_truth(_write(tmp_path / "gt.json", data))
    assert gt.anns[1]["area"] == 40.0 and gt.anns[1]["iscrowd"] == 0
    coco_map(gt, [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 4], "score": 1.0}])
    assert capsys.readouterr().out == ""  # the library never prints


def test_split_naming_unknown_category_raises(gt_path):
    gt = load_ground_truth(gt_path)
    with pytest.raises(BadAnnotations, match="1 categories not in the ground truth.*'unicorn'"):
        coco_map(gt, [], {"base": ["car"], "novel": ["unicorn"]})
    with pytest.raises(BadAnnotations, match="both base and novel"):
        coco_map(gt, [], {"base": ["car"], "novel": ["car"]})
    with pytest.raises(BadAnnotations, match="no 'novel' list"):
        coco_map(gt, [], {"base": ["car"]})


# --- GT-box protocol -------------------------------------------------------------------------

# Six categories a..f (COCO ids 10..15), base a b c, novel d e f; two images, four boxes.
HAND_CATS = {10: "a", 11: "b", 12: "c", 13: "d", 14: "e", 15: "f"}
HAND_SPLIT = {"base": ["a", "b", "c"], "novel": ["d", "e", "f"]}
# Columns follow category ids 10..15. Rank of the true category in each row:
#   box 1 (a): 0.9 is the best             -> rank 1: top-1 hit,  top-5 hit
#   box 2 (b): 0.3 is behind a's 0.5       -> rank 2: top-1 miss, top-5 hit
#   box 3 (d): 0.6 is the best             -> rank 1: top-1 hit,  top-5 hit
#   box 4 (f): 0.0 is the worst of six     -> rank 6: top-1 miss, top-5 miss
# overall top-1 2/4 = 50, top-5 3/4 = 75; base (boxes 1, 2) 50 / 100; novel (boxes 3, 4) 50 / 50.
HAND_SCORES = {
    1: torch.tensor([[0.9, 0.05, 0.01, 0.02, 0.01, 0.01],
                     [0.5, 0.30, 0.10, 0.05, 0.03, 0.02]]),
    2: np.array([[0.1, 0.10, 0.10, 0.60, 0.05, 0.05],
                 [0.3, 0.25, 0.20, 0.15, 0.10, 0.00]]),
}


@pytest.fixture
def hand_gt(tmp_path) -> COCO:
    boxes = [(1, 10, [10.0, 10.0, 50.0, 40.0]), (1, 11, [100.0, 100.0, 60.0, 60.0]),
             (2, 13, [5.0, 5.0, 30.0, 30.0]), (2, 15, [80.0, 20.0, 40.0, 90.0])]
    return load_ground_truth(_write(tmp_path / "hand.json", _coco_dict([(200, 200)] * 2, boxes, HAND_CATS)))


def _hand_ann_ids(gt: COCO) -> dict[int, list[int]]:
    return {img: gt_boxes(gt, img)[0] for img in (1, 2)}


def test_gt_boxes_are_xyxy(hand_gt):
    ids, boxes = gt_boxes(hand_gt, 1)
    assert ids == [1, 2]
    torch.testing.assert_close(boxes, torch.tensor([[10.0, 10.0, 60.0, 50.0], [100.0, 100.0, 160.0, 160.0]]))


def test_gt_box_accuracy_hand_checked(hand_gt):
    report = gt_box_accuracy(hand_gt, HAND_SCORES, _hand_ann_ids(hand_gt), list(HAND_CATS), HAND_SPLIT)
    assert report == {
        "overall": {"top1": 50.0, "top5": 75.0, "boxes": 4},
        "base": {"top1": 50.0, "top5": 100.0, "boxes": 2},
        "novel": {"top1": 50.0, "top5": 50.0, "boxes": 2},
    }
    # Columns in another order give the same figures once category_ids follow them.
    order = [15, 14, 13, 12, 11, 10]
    flipped = {img: np.asarray(s)[:, ::-1].copy() for img, s in HAND_SCORES.items()}
    assert gt_box_accuracy(hand_gt, flipped, _hand_ann_ids(hand_gt), order, HAND_SPLIT) == report


def test_gt_box_records_feed_coco_map(hand_gt):
    records = gt_box_records(hand_gt, HAND_SCORES, _hand_ann_ids(hand_gt), list(HAND_CATS), top_k=1)
    # Top-1 labels: box 1 -> a 0.9, box 2 -> a 0.5, box 3 -> d 0.6, box 4 -> a 0.3.
    assert [(r["image_id"], r["category_id"]) for r in records] == [(1, 10), (1, 10), (2, 13), (2, 10)]
    assert [r["score"] for r in records] == pytest.approx([0.9, 0.5, 0.6, 0.3])
    assert records[3]["bbox"] == [80.0, 20.0, 40.0, 90.0]
    # a: its one box found first (the two wrong "a" records rank below) -> 100; d -> 100;
    # b and f never predicted -> 0; c and e have no ground truth -> None. Mean 50.
    report = coco_map(hand_gt, records, HAND_SPLIT)
    expected = {"a": 100.0, "b": 0.0, "c": None, "d": 100.0, "e": None, "f": 0.0}
    assert report["per_category"].keys() == expected.keys()
    for name, ap in expected.items():
        assert report["per_category"][name] == (None if ap is None else pytest.approx(ap)), name
    assert report["overall"]["AP"] == pytest.approx(50.0)
    assert report["base"]["AP"] == pytest.approx(50.0) and report["novel"]["AP"] == pytest.approx(50.0)
    assert len(gt_box_records(hand_gt, HAND_SCORES, _hand_ann_ids(hand_gt), list(HAND_CATS))) == 4 * 5


def test_gt_box_inputs_must_line_up(hand_gt):
    ann_ids = _hand_ann_ids(hand_gt)
    with pytest.raises(BadInput, match=r"must have shape \(2, 6\)"):
        gt_box_accuracy(hand_gt, {**HAND_SCORES, 2: np.zeros((2, 5))}, ann_ids, list(HAND_CATS))
    with pytest.raises(BadInput, match="lacks 1 ground-truth categories"):
        gt_box_accuracy(hand_gt, {1: np.zeros((2, 5)), 2: np.zeros((2, 5))}, ann_ids, [10, 11, 12, 13, 14])
    with pytest.raises(BadAnnotations, match="annotation 3 is not a box of image 1"):
        gt_box_accuracy(hand_gt, HAND_SCORES, {1: [1, 3], 2: [2, 4]}, list(HAND_CATS))


# --- report and split files ------------------------------------------------------------------


def test_write_report_is_valid_json(tmp_path):
    path = write_report({"overall": {"AP": float("nan"), "AP50": np.float64(12.5)}, "n": torch.tensor(3)},
                        tmp_path / "out" / "report.json")
    assert json.loads(path.read_text()) == {"overall": {"AP": None, "AP50": 12.5}, "n": 3}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary left behind


def test_ovd_coco_split():
    split = load_split(REPO / "configs" / "splits" / "ovd_coco.yaml")
    base, novel = split["base"], split["novel"]
    assert (len(base), len(novel)) == (48, 17)
    assert len(set(base)) == 48 and len(set(novel)) == 17 and not set(base) & set(novel)
    assert {"airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
            "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"} == set(novel)
