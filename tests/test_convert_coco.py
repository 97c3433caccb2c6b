"""``regionclip convert --to coco``: results records for eval --results, instances files for train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regionclip.convert import convert
from regionclip.errors import BadInput
from regionclip.records import ImageRecord, Results

LABELS = ["red circle", "green square"]


def _results() -> Results:
    return Results(images=[
        ImageRecord("/data/a/x.jpg", 100, 80, np.array([[10, 20, 30, 60], [0, 0, 5, 5]]), ["green square", "red circle"],
                    np.array([0.9, 0.2])),
        ImageRecord("/data/a/b/y.jpg", 50, 40, np.zeros((0, 4)), [], np.zeros(0)),
        ImageRecord("/data/a/bad.jpg", None, None, np.zeros((0, 4)), [], np.zeros(0), error="not a readable image"),
    ], vocabulary=LABELS, model="demo")


def test_results_records(tmp_path):
    out = convert(_results(), "coco", tmp_path / "r.json", min_score=0.5)
    records = json.loads(out.read_text())
    assert records == [{"image_id": 0, "category_id": 2, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.9,
                        "image": "/data/a/x.jpg", "label": "green square"}]
    assert len(json.loads(convert(_results(), "coco", tmp_path / "all.json").read_text())) == 2


def test_instances_file(tmp_path):
    data = json.loads(convert(_results(), "coco", tmp_path / "i.json", instances=True).read_text())
    assert data["info"]["images_dir"] == "/data/a"
    assert data["images"] == [{"id": 1, "file_name": "x.jpg", "width": 100, "height": 80},
                              {"id": 2, "file_name": "b/y.jpg", "width": 50, "height": 40}]  # no undecodable one
    assert data["categories"] == [{"id": 1, "name": "red circle", "supercategory": ""},
                                  {"id": 2, "name": "green square", "supercategory": ""}]
    assert [(a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in data["annotations"]] == [
        (1, 2, [10.0, 20.0, 20.0, 40.0], 800.0), (1, 1, [0.0, 0.0, 5.0, 5.0], 25.0)]
    assert [a["id"] for a in data["annotations"]] == [1, 2]
    with pytest.raises(BadInput, match=r"--min-score must be in \[0, 1\]"):
        convert(_results(), "coco", tmp_path / "x.json", min_score=2.0)


def test_one_instances_writer_clips_and_maps_unknown_labels(tmp_path):
    """coco and cvat write the same instances (ids from 1, boxes clipped to the image); a label
    the vocabulary lacks is a category after it in both, and in the results records (never id 0)."""
    import zipfile

    results = Results(images=[ImageRecord("/data/a/x.jpg", 100, 80, np.array([[-4.0, 10, 30, 90], [50, 50, 60, 60]]),
                                          ["blue triangle", "red circle"], np.array([0.8, 0.6]))],
                      vocabulary=LABELS, model="demo")
    coco = json.loads(convert(results, "coco", tmp_path / "i.json", instances=True).read_text())
    assert coco["categories"][2] == {"id": 3, "name": "blue triangle", "supercategory": ""}
    assert [(a["category_id"], a["bbox"]) for a in coco["annotations"]] == [(3, [0.0, 10.0, 30.0, 70.0]),
                                                                         (1, [50.0, 50.0, 10.0, 10.0])]
    with zipfile.ZipFile(convert(results, "cvat", tmp_path / "c.zip")) as zf:
        cvat = json.loads(zf.read("annotations/instances_default.json"))
    for a in cvat["annotations"]:
        assert a.pop("attributes") == {"occluded": False}
    assert cvat == coco
    records = json.loads(convert(results, "coco", tmp_path / "r.json").read_text())
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in records] == [(0, 3, [0.0, 10.0, 30.0, 70.0]),
                                                                             (0, 1, [50.0, 50.0, 10.0, 10.0])]


def test_label_then_instances_then_cocodetection(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from test_label import label_argv, make_images, run, save_tiny

    from regionclip.data.coco import CocoDetection

    images = make_images(tmp_path / "imgs", 3, size=40)
    out = tmp_path / "labels"
    code, _, err = run(label_argv(save_tiny(tmp_path / "model"), images, out, "--shard-size", "2"), capsys)
    assert code == 0, err
    code, stdout, err = run(["convert", str(out), "--to", "coco", "--instances", "--out", str(tmp_path / "train.json")],
                            capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "train.json").read_text())
    assert stdout.strip() == f"wrote {tmp_path / 'train.json'}: 3 image(s), {len(data['annotations'])} box(es)"
    code, stdout, err = run(["convert", str(out), "--to", "labelstudio", "--out", str(tmp_path / "ls")], capsys)
    assert code == 0 and stdout.strip() == f"wrote {tmp_path / 'ls'}: 3 task(s), {len(data['annotations'])} box(es)", err
    ds = CocoDetection(tmp_path / "train.json", data["info"]["images_dir"], categories=LABELS)
    assert len(ds) == 3 and ds.category_names == LABELS
    from regionclip.records import load_results

    results = load_results(out)
    for i, rec in enumerate(results.images):
        image, target = ds[i]
        assert tuple(image.shape[1:]) == (40, 40)
        keep = (rec.boxes_xyxy[:, 2] - rec.boxes_xyxy[:, 0] >= 1) & (rec.boxes_xyxy[:, 3] - rec.boxes_xyxy[:, 1] >= 1)
        torch.testing.assert_close(target["boxes"], torch.from_numpy(rec.boxes_xyxy[keep]), atol=2e-3, rtol=0)
        assert [LABELS[j] for j in target["labels"].tolist()] == [lab for lab, k in zip(rec.labels, keep) if k]


def test_label_then_convert_then_eval_matches_detect_json(tiny_shapes, tmp_path, capsys):
    """The demo model over the shapes val images: eval --results of the converted label folder
    scores exactly what eval --results of detect --json scores for the same model and settings."""
    pytest.importorskip("pyarrow")
    from test_label import run

    images, gt = str(tiny_shapes["val_images"]), str(tiny_shapes["val_annotations"])
    common = ["--model", "demo", "--device", "cpu", "--score-threshold", "0.05", "--batch-size", "2"]
    labels = ",".join(c["name"] for c in json.loads(open(gt).read())["categories"])
    code, _, err = run(["label", images, "--labels", labels, "--out", str(tmp_path / "lab"), "--workers", "0",
                        *common], capsys)
    assert code == 0, err
    code, _, err = run(["convert", str(tmp_path / "lab"), "--to", "coco", "--out", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    code, _, err = run(["detect", images, "--labels", labels, "--json", str(tmp_path / "d.json"), "--workers", "0",
                        *common], capsys)
    assert code == 0, err
    maps = []
    for results in ("r.json", "d.json"):
        code, _, err = run(["eval", "--annotations", gt, "--results", str(tmp_path / results),
                            "--json", str(tmp_path / f"report-{results}")], capsys)
        assert code == 0, err
        maps.append(json.loads((tmp_path / f"report-{results}").read_text())["map"]["overall"])
    assert maps[0]["AP50"] > 0.3, maps[0]  # the demo model finds shapes: a real score, not an empty file's
    for key in maps[0]:
        assert maps[0][key] == pytest.approx(maps[1][key], abs=1e-3), key
