"""How sure a run is (``regionclip.doubt``): the figures ``scoring.select`` gives each box, the
priority ``label`` records per image, and the order ``most_doubtful`` / ``convert`` take from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regionclip.config import ScoringConfig
from regionclip.doubt import box_doubt, image_priority, most_doubtful
from regionclip.exemplars import VocabRules
from regionclip.records import ImageRecord, Results
from regionclip.scoring import select, select_pairs

BOXES = torch.tensor([[0, 0, 10, 10],  # a: kept, 0.5 ahead of the next column, 0.4 above its threshold
                      [1, 0, 11, 10],  # under a (IoU 0.82): a duplicate, not a miss
                      [50, 50, 60, 60],  # alone, 0.05 under the threshold: the near miss
                      [100, 100, 110, 110],  # a class above its threshold beaten by the distractor by 0.2
                      [200, 200, 210, 210]], dtype=torch.float32)  # b at 0.45, its own threshold 0.4
PROBS = torch.tensor([[0.70, 0.10, 0.20],
                      [0.29, 0.01, 0.10],
                      [0.25, 0.05, 0.10],
                      [0.40, 0.00, 0.60],
                      [0.05, 0.45, 0.50]])


def test_select_gives_each_detection_its_margin_and_gap_and_the_image_its_near_miss():
    cfg = ScoringConfig(score_threshold=0.3, agnostic_nms=False, nms_iou=0.5)
    d = select(BOXES, PROBS, cfg, ["a", "b"], rules=VocabRules(thresholds=(None, 0.4), num_distractors=1))
    assert d.names == ["a"]  # b (box 5) loses its row to the distractor
    torch.testing.assert_close(d.doubt.margins, torch.tensor([0.5]))
    torch.testing.assert_close(d.doubt.threshold_gaps, torch.tensor([0.4]))
    # box 3: 1 - (0.3 - 0.25) / 0.3; box 4: 1 - (0.6 - 0.4); box 5: 1 - (0.5 - 0.45)
    torch.testing.assert_close(d.doubt.near_miss, torch.tensor(0.95))
    assert box_doubt(d.scores, d.doubt.margins, d.doubt.threshold_gaps) == pytest.approx([0.5])  # 1 - min(0.5, 0.4 / 0.7)
    assert image_priority(d.scores, d.doubt.margins, d.doubt.threshold_gaps, float(d.doubt.near_miss)) == \
        pytest.approx(0.95)
    # Indexing and the device move keep the figures with their boxes.
    assert d[torch.tensor([False])].doubt.margins.shape == (0,) and d.cpu().doubt is not None
    # Given boxes: no selection, no figures.
    assert select(BOXES, PROBS[:, :2], cfg, ["a", "b"], filter_boxes=False).doubt is None


def test_regionclip_selection_gives_figures_too():
    cfg = ScoringConfig(score_threshold=0.3, nms_iou=0.5, recipe="regionclip", background=True)
    d = select_pairs(BOXES, PROBS[:, :2], cfg, ["a", "b"])
    assert d.names == ["a", "b", "a"]  # without the distractor column box 4 is an "a"
    torch.testing.assert_close(d.doubt.margins, torch.tensor([0.6, 0.4, 0.4]))
    torch.testing.assert_close(d.doubt.threshold_gaps, torch.tensor([0.4, 0.15, 0.1]))
    torch.testing.assert_close(d.doubt.near_miss, torch.tensor(1 - 0.05 / 0.3))


def _record(name, scores, margins=None, gaps=None, near=None, priority=None, error=None):
    n = len(scores)
    return ImageRecord(name, 10, 10, [[0, 0, 5, 5]] * n, ["a"] * n, scores, error, margins, gaps, near, priority)


def test_most_doubtful_ranks_by_priority_and_falls_back_to_scores():
    results = Results([
        _record("sure.png", [0.9], [0.8], [0.6], 0.0),  # doubt 1 - min(0.8, 0.6 / 0.7) = 0.2
        _record("tie.png", [0.6], [0.1], [0.3], 0.2),  # 0.9: a close second name
        _record("missed.png", [], [], [], 0.95),  # nothing kept, a box just under the threshold
        _record("broken.png", [], error="not an image"),
        _record("stored.png", [0.9], priority=0.5),
    ], ["a"], meta={"scoring": {"score_threshold": 0.3}})
    got = most_doubtful(results)
    assert [name for name, _ in got] == ["missed.png", "tie.png", "stored.png", "sure.png"]
    assert [p for _, p in got] == pytest.approx([0.95, 0.9, 0.5, 0.2])
    assert most_doubtful(results, 2) == got[:2]
    # Without figures (detect --json, old label folders): the gap to the run's threshold alone.
    old = Results([_record("x.png", [0.31]), _record("y.png", [0.93]), _record("z.png", [])], ["a"],
                  meta={"scoring": {"score_threshold": 0.3}})
    assert most_doubtful(old) == [("x.png", pytest.approx(1 - 0.01 / 0.7)), ("y.png", pytest.approx(0.1)),
                                  ("z.png", 0.0)]


def test_label_records_the_figures_and_folders_without_them_still_rank(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    from test_label import make_images, run, save_tiny

    from regionclip.convert import convert
    from regionclip.records import load_results

    images = make_images(tmp_path / "im", 3)
    out = tmp_path / "lab"
    code, _, err = run(["label", *images, "--labels", "red circle,green square", "--model", save_tiny(tmp_path / "m"),
                        "--out", str(out), "--score-threshold", "0.52", "--max-detections", "3", "--workers", "0"], capsys)
    assert code == 0, err
    rows = pq.read_table(out / "shard-00000.parquet").to_pylist()
    for r in rows:
        assert len(r["margins"]) == len(r["threshold_gaps"]) == len(r["scores"])
        assert np.all(np.asarray(r["threshold_gaps"]) >= 0) and 0 <= r["near_miss"] <= 1
        assert r["priority"] == pytest.approx(image_priority(r["scores"], r["margins"], r["threshold_gaps"],
                                                             r["near_miss"]), abs=1e-6)
    ranked = most_doubtful(out)
    assert sorted(name for name, _ in ranked) == sorted(images)
    assert [p for _, p in ranked] == sorted((r["priority"] for r in rows), reverse=True)
    # A folder written before the doubt columns: read, ranked by the gap to the manifest's threshold, converted.
    table = pq.read_table(out / "shard-00000.parquet")
    pq.write_table(table.drop_columns(["margins", "threshold_gaps", "near_miss", "priority"]),
                   out / "shard-00000.parquet")
    old = load_results(out)
    assert all(r.margins is None and r.priority is None for r in old.images)
    assert [p for _, p in most_doubtful(old)] == pytest.approx(sorted(
        (image_priority(r["scores"], threshold=0.52) for r in rows), reverse=True))
    coco = json.loads(convert(old, "coco", tmp_path / "c.json", instances=True).read_text())
    assert len(coco["images"]) == 3
