"""``regionclip eval`` end to end on generated shapes data with a tiny random model."""

import json

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_cli import TINY, run

from regionclip.data.shapes import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=0, n_val=4, seed=3, image_size=(96, 128))


def test_eval_runs_the_model_and_reports_splits(shapes, tmp_path, capsys):
    report_path, results_path = tmp_path / "report.json", tmp_path / "results.json"
    code, out, err = run(["eval", "--annotations", str(shapes["val_annotations"]), "--images", str(shapes["val_images"]),
                          "--split", str(shapes["split"]), *TINY, "--json", str(report_path),
                          "--results-out", str(results_path), "--batch-size", "3"], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert set(report["map"]) == {"overall", "base", "novel", "per_category"}
    assert report["settings"]["images"] == 4 and report["settings"]["vocabulary_size"] == 12
    assert report["settings"]["images_per_second"] > 0 and report["images_skipped"] == 0
    assert "COCO bbox mAP" in out
    # The written results scored by pycocotools directly give the same overall AP50.
    gt = COCO(str(shapes["val_annotations"]))
    ev = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert report["map"]["overall"]["AP50"] == pytest.approx(ev.stats[1] * 100, abs=1e-3)


def test_eval_keeps_cocos_100_detections_whatever_the_models_cap(shapes, tmp_path, capsys):
    # The model's max_detections caps `detect` output; COCO AP counts up to 100 per image.
    results_path = tmp_path / "results.json"
    code, out, err = run(["eval", "--annotations", str(shapes["val_annotations"]), "--images", str(shapes["val_images"]),
                          *TINY, "--set", "scoring.max_detections=1", "--json", str(tmp_path / "r.json"),
                          "--results-out", str(results_path)], capsys)
    assert code == 0, err
    per_image: dict[int, int] = {}
    for r in json.loads(results_path.read_text()):
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) > 1 and max(per_image.values()) <= 100
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["max_detections"] == 100


def test_eval_scores_an_existing_results_file(shapes, tmp_path, capsys):
    gt = json.loads(shapes["val_annotations"].read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    res = tmp_path / "res.json"
    res.write_text(json.dumps(perfect))
    code, out, err = run(["eval", "--annotations", str(shapes["val_annotations"]), "--results", str(res),
                          "--split", str(shapes["split"]), "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["map"]["overall"]["AP50"] == pytest.approx(100.0)


def test_gt_box_protocol(shapes, tmp_path, capsys):
    code, out, err = run(["eval", "--annotations", str(shapes["val_annotations"]), "--images", str(shapes["val_images"]),
                          "--split", str(shapes["split"]), "--proposals", "gt", *TINY, "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    acc = json.loads((tmp_path / "r.json").read_text())["accuracy"]
    gt = json.loads(shapes["val_annotations"].read_text())
    assert acc["overall"]["boxes"] == len(gt["annotations"])
    assert 0 <= acc["overall"]["top1"] <= acc["overall"]["top5"] <= 100
    assert "GT-box region accuracy" in out


def test_missing_images_are_skipped_and_counted(shapes, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for p in sorted(shapes["val_images"].iterdir())[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    code, out, err = run(["eval", "--annotations", str(shapes["val_annotations"]), "--images", str(images), *TINY,
                          "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images_skipped"] == 1 and report["settings"]["images"] == 3
    assert "1 image(s) skipped" in err


@pytest.mark.parametrize("case,expect", [
    ("missing_annotations", "does not exist"),
    ("not_coco", "COCO"),
    ("unknown_image", "image ids not in the ground truth"),
    ("unknown_category", "category ids not in the ground truth"),
    ("no_images_flag", "pass --images"),
])
def test_bad_eval_input_gives_one_line(case, expect, shapes, tmp_path, capsys):
    ann = str(shapes["val_annotations"])
    argv = ["eval", "--annotations", ann, "--results"]
    res = tmp_path / "res.json"
    if case == "missing_annotations":
        argv = ["eval", "--annotations", str(tmp_path / "nope.json"), "--results", str(res)]
    elif case == "not_coco":
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"hello": 1}))
        argv = ["eval", "--annotations", str(bad), "--results", str(res)]
    elif case == "unknown_image":
        res.write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
        argv.append(str(res))
    elif case == "unknown_category":
        res.write_text(json.dumps([{"image_id": 1, "category_id": 77, "bbox": [0, 0, 5, 5], "score": 0.5}]))
        argv.append(str(res))
    elif case == "no_images_flag":
        argv = ["eval", "--annotations", ann, *TINY]
    code, out, err = run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1, err
    assert expect.lower() in lines[0].lower(), err
    assert "Traceback" not in err
