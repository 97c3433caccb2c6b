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
    # Class-agnostic proposal recall per split, in the table and the report.
    recall = report["proposal_recall"]
    assert set(recall) == {"overall", "base", "novel"} and "proposal recall" in out
    assert recall["base"]["gt"] + recall["novel"]["gt"] == recall["overall"]["gt"] == len(
        json.loads(shapes["val_annotations"].read_text())["annotations"])
    for row in recall.values():
        assert row["R50@10"] <= row["R50@100"] <= row["R50@300"] and row["AR@100"] <= row["R50@100"], row
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


# ---- issue 15: detect -> eval round trip, checks before the model ---------------------------------


def _detect_json(shapes, tmp_path, capsys, name, extra):
    out = tmp_path / name
    code, _, err = run(["detect", str(shapes["val_images"]), *TINY, "--score-threshold", "0", "--no-agnostic-nms",
                        "--json", str(out), *extra], capsys)
    assert code == 0, err
    return out, err


def _ap(report_path):
    return json.loads(report_path.read_text())["map"]["overall"]


def _pycocotools_ap(gt_path, records):
    coco = COCO(str(gt_path))
    ev = COCOeval(coco, coco.loadRes(records), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev.stats[0] * 100, ev.stats[1] * 100


def test_detect_json_scores_in_eval_and_pycocotools(shapes, tmp_path, capsys):
    gt_path = shapes["val_annotations"]
    gt = json.loads(gt_path.read_text())
    names = [c["name"] for c in gt["categories"]]
    file_ids = {img["file_name"]: img["id"] for img in gt["images"]}
    # With the ground truth: its ids, ready for pycocotools as they are.
    with_gt, err = _detect_json(shapes, tmp_path, capsys, "with_gt.json",
                                ["--annotations", str(gt_path), "--labels", ",".join(names + ["purple star"])])
    assert "1 label(s) are not categories" in err and "'purple star'" in err
    records = json.loads(with_gt.read_text())
    assert records and all(r["image_id"] == file_ids[r["image"].rsplit("/", 1)[-1]] for r in records)
    assert {r["category_id"] for r in records} <= {c["id"] for c in gt["categories"]}
    assert all(r["label"] != "purple star" for r in records)
    code, _, err = run(["eval", "--annotations", str(gt_path), "--results", str(with_gt), "--json", str(tmp_path / "a.json")],
                       capsys)
    assert code == 0, err
    ap, ap50 = _pycocotools_ap(gt_path, str(with_gt))
    assert _ap(tmp_path / "a.json")["AP"] == pytest.approx(ap, abs=1e-6)
    assert _ap(tmp_path / "a.json")["AP50"] == pytest.approx(ap50, abs=1e-6)
    # Without it (vocabulary in another order): image_id is the input position and category_id the
    # vocabulary position; eval takes the ids from the image paths and label names instead.
    without, _ = _detect_json(shapes, tmp_path, capsys, "without.json", ["--labels", ",".join(names[::-1])])
    plain = json.loads(without.read_text())
    assert sorted({r["image_id"] for r in plain}) == list(range(len(gt["images"])))
    assert all(r["category_id"] == names[::-1].index(r["label"]) + 1 for r in plain)
    code, _, err = run(["eval", "--annotations", str(gt_path), "--results", str(without), "--json", str(tmp_path / "b.json")],
                       capsys)
    assert code == 0, err
    mapped = [{**r, "image_id": file_ids[r["image"].rsplit("/", 1)[-1]], "category_id": names.index(r["label"]) + 1}
              for r in plain]
    ap, ap50 = _pycocotools_ap(gt_path, mapped)
    assert _ap(tmp_path / "b.json")["AP"] == pytest.approx(ap, abs=1e-6)
    assert _ap(tmp_path / "b.json")["AP50"] == pytest.approx(ap50, abs=1e-6)


def test_detect_style_records_of_the_truth_score_100(shapes, tmp_path, capsys):
    """Records as `detect --json` writes them without --annotations: paths and names, ids that mean nothing."""
    gt = json.loads(shapes["val_annotations"].read_text())
    files = {img["id"]: img["file_name"] for img in gt["images"]}
    cats = {c["id"]: c["name"] for c in gt["categories"]}
    records = [{"image": f"some/where/{files[a['image_id']]}", "image_id": k, "label": cats[a["category_id"]],
                "category_id": 99, "bbox": a["bbox"], "score": 1.0} for k, a in enumerate(gt["annotations"])]
    res = tmp_path / "res.json"
    res.write_text(json.dumps(records))
    code, out, err = run(["eval", "--annotations", str(shapes["val_annotations"]), "--results", str(res),
                          "--split", str(shapes["split"]), "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert _ap(tmp_path / "r.json")["AP50"] == pytest.approx(100.0)


def test_detect_annotations_unknown_image_fails_before_the_model(shapes, tmp_path, capsys, monkeypatch):
    from regionclip.detector import RegionCLIP

    monkeypatch.setattr(RegionCLIP, "__init__", lambda *a, **k: pytest.fail("model built before the check"))
    stray = tmp_path / "stray.jpg"
    stray.write_bytes(next(shapes["val_images"].iterdir()).read_bytes())
    code, out, err = run(["detect", str(shapes["val_images"]), str(stray), "--annotations", str(shapes["val_annotations"]),
                          *TINY], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and "match no file_name" in lines[0] and "stray.jpg" in lines[0], err


def test_results_with_unknown_label_is_one_line(shapes, tmp_path, capsys):
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image": "000000.jpg", "label": "purple star", "bbox": [0, 0, 5, 5], "score": 0.5}]))
    code, out, err = run(["eval", "--annotations", str(shapes["val_annotations"]), "--results", str(res)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "labels that are not categories" in lines[0], err


@pytest.mark.parametrize("case", ["unknown_name", "vocabulary_misses_split"])
def test_split_is_checked_before_the_model(case, shapes, tmp_path, capsys, monkeypatch):
    from regionclip.detector import RegionCLIP

    monkeypatch.setattr(RegionCLIP, "__init__", lambda *a, **k: pytest.fail("model built before the split check"))
    split = tmp_path / "split.yaml"
    argv = ["eval", "--annotations", str(shapes["val_annotations"]), "--images", str(shapes["val_images"]),
            "--split", str(split), *TINY]
    if case == "unknown_name":
        split.write_text("base: [red circle]\nnovel: [purple star]\n")
        expect = "categories not in the ground truth"
    else:
        split.write_text("base: [red circle]\nnovel: [green circle]\n")
        argv += ["--vocabulary", "blue square,yellow square"]
        expect = "none of the split's categories is in the vocabulary"
    code, out, err = run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and expect in lines[0], err
