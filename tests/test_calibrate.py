"""``regionclip calibrate``: matching, the precision/recall curve, the chosen thresholds, and the
command on a tiny set writing a tuned vocabulary file that reads back."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_cli import TINY, run

from regionclip.calibrate import curve, fit, match, measure
from regionclip.errors import BadInput
from regionclip.vocabulary import Vocabulary


def test_match_takes_each_gt_box_once_best_score_first():
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30.0]])
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60], [20, 20, 31, 30.0]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.3])
    # 0.9 takes GT 0 first; 0.5 (a duplicate) then finds it taken; 0.8 hits nothing; 0.3 takes GT 1.
    assert match(boxes, scores, gt) == [(pytest.approx(0.9), True), (pytest.approx(0.8), False),
                                        (pytest.approx(0.5), False), (pytest.approx(0.3), True)]
    assert match(boxes[:1], scores[:1], torch.zeros(0, 4)) == [(pytest.approx(0.5), False)]


def test_fit_picks_the_lowest_threshold_that_holds_the_precision_or_the_best_f1():
    pairs = [(0.9, True), (0.8, True), (0.7, False), (0.6, True), (0.5, False), (0.4, False), (0.3, False)]
    thr, prec, rec = curve(pairs, gt=5)
    assert thr.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    assert prec[3] == pytest.approx(0.75) and rec[3] == pytest.approx(0.6)
    collected = {"a": pairs, "__gt__/a": 5}
    (f,) = fit(collected, ["a"], precision=0.75)
    assert (f.threshold, f.precision, f.recall, f.detections, f.reached) == (0.6, 0.75, 0.6, 4, True)
    (f,) = fit(collected, ["a"], precision=None)  # F1: 2PR/(P+R) is best at 0.6 (0.667)
    assert f.threshold == 0.6
    (f,) = fit({"a": [(0.9, False), (0.5, True)], "__gt__/a": 1}, ["a"], precision=0.9)
    assert not f.reached and f.threshold == 0.5  # out of reach: its best precision
    (m,) = measure(collected, ["a"], [0.75])
    assert (m.precision, m.recall, m.detections) == (1.0, 0.4, 2)
    with pytest.raises(BadInput):
        fit(collected, ["a"], precision=1.5)


def test_ties_keep_every_detection_of_the_score():
    thr, prec, _ = curve([(0.5, True), (0.5, False), (0.4, True)], gt=2)
    assert thr.tolist() == [0.5, 0.4] and prec.tolist() == [0.5, pytest.approx(2 / 3)]


def test_calibrate_command_writes_a_tuned_file_that_reads_back(tiny_shapes, tmp_path, capsys):
    vocab = tmp_path / "v.yaml"
    vocab.write_text("red circle: {}\ngreen square: {prompts: [green square, green box]}\n")
    out = tmp_path / "tuned.yaml"
    code, stdout, err = run(["calibrate", "--annotations", str(tiny_shapes["val_annotations"]),
                             "--images", str(tiny_shapes["val_images"]), "--vocab", str(vocab), "--out", str(out),
                             "--target-precision", "0.5", *TINY], capsys)
    assert code == 0, err
    assert "expected (precision 0.5)" in stdout
    data = yaml.safe_load(out.read_text())
    assert data["target"] == {"precision": 0.5} and data["calibrated_on"]["image_count"] > 0
    assert set(data["expected"]) == {"red circle", "green square"}
    tuned = Vocabulary.from_yaml(out)
    assert tuned.names == ["red circle", "green square"]
    assert tuned.classes[1].prompts == ("green square", "green box")
    assert tuned.thresholds == [data["classes"][n].get("threshold") for n in tuned.names]
    code, _, err = run(["calibrate", "--annotations", str(tiny_shapes["val_annotations"]), "--images",
                        str(tiny_shapes["val_images"]), "--vocab", str(vocab), "--out", str(out), *TINY], capsys)
    assert code == 2 and "--target-precision P" in err
