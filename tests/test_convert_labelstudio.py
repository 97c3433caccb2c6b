"""regionclip convert --to labelstudio: tasks JSON with rectanglelabels predictions + config XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from conftest import shapes_image
from regionclip.convert import convert
from regionclip.errors import BadInput
from regionclip.records import ImageRecord, Results, load_results


def results(tmp_path) -> Results:
    Image.fromarray(shapes_image(100, 200)).save(tmp_path / "a.png")
    return Results(images=[
        ImageRecord(str(tmp_path / "a.png"), 200, 100, [[20, 10, 60, 50], [0, 0, 200, 100]], ["dog", 'c"a<t'], [0.9, 0.2]),
        ImageRecord("gone.png", None, None, [], [], [], error="not an image"),
    ], vocabulary=["dog", 'c"a<t', "bird"], model="demo")


def test_tasks_and_config(tmp_path):
    out = convert(results(tmp_path), "labelstudio", tmp_path / "ls", from_name="box", to_name="img",
                  image_prefix="/data/local-files/?d=")
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == 1  # the undecodable image has nothing to show
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=" + str(tmp_path / "a.png")
    (pred,) = tasks[0]["predictions"]
    # the image's review priority (regionclip.doubt), here from the scores alone: 1 - min(0.9, 0.2);
    # the prediction's score is 1 - it, so Label Studio's sort by prediction score puts it first
    assert tasks[0]["data"]["priority"] == pytest.approx(0.8)
    assert pred["model_version"] == "demo" and pred["score"] == pytest.approx(0.2)
    first, second = pred["result"]
    assert first["type"] == "rectanglelabels" and (first["from_name"], first["to_name"]) == ("box", "img")
    assert (first["original_width"], first["original_height"]) == (200, 100)
    assert first["value"] == {"x": 10.0, "y": 10.0, "width": 20.0, "height": 40.0, "rotation": 0,
                              "rectanglelabels": ["dog"]}
    assert first["score"] == pytest.approx(0.9)
    assert second["value"]["rectanglelabels"] == ['c"a<t'] and second["value"]["width"] == 100.0
    view = ET.fromstring((out / "config.xml").read_text())
    image, rects = view
    assert (image.tag, image.get("name"), image.get("value")) == ("Image", "img", "$image")
    assert (rects.tag, rects.get("name"), rects.get("toName")) == ("RectangleLabels", "box", "img")
    assert [label.get("value") for label in rects] == ["dog", 'c"a<t', "bird"]


def test_min_score_and_model_version(tmp_path):
    out = convert(results(tmp_path), "labelstudio", tmp_path / "ls", min_score=0.5, model_version="v7")
    (pred,) = json.loads((out / "tasks.json").read_text())[0]["predictions"]
    assert pred["model_version"] == "v7"
    assert [r["value"]["rectanglelabels"] for r in pred["result"]] == [["dog"]]
    assert pred["result"][0]["from_name"] == "label" and pred["result"][0]["to_name"] == "image"


def test_unknown_size_names_the_remedy(tmp_path):
    res = Results([ImageRecord("elsewhere.png", None, None, [[0, 0, 1, 1]], ["dog"], [0.5])], ["dog"])
    with pytest.raises(BadInput, match="image size unknown.*run convert where"):
        convert(res, "labelstudio", tmp_path / "ls")


def test_from_a_detect_json_through_the_cli(tmp_path, monkeypatch):
    """detect --json with the demo model, then `regionclip convert`: boxes back in pixels."""
    from regionclip_cli.main import main

    monkeypatch.chdir(tmp_path)
    for i in range(2):
        Image.fromarray(shapes_image(120, 160 + 20 * i, seed=i)).save(f"im{i}.png")
    _run(main, ["detect", "im0.png", "im1.png", "--model", "demo", "--json", "det.json", "--workers", "0"])
    _run(main, ["convert", "det.json", "--to", "labelstudio", "--out", "ls", "--model-version", "m1"])
    source = load_results("det.json")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [r.image for r in source.images]
    for task, record in zip(tasks, source.images):
        res = task["predictions"][0]["result"]
        assert len(res) == len(record.labels) > 0
        w, h = res[0]["original_width"], res[0]["original_height"]
        back = np.array([[v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100,
                          (v["y"] + v["height"]) * h / 100] for v in (r["value"] for r in res)])
        np.testing.assert_allclose(back, record.boxes_xyxy, atol=1e-3)
        assert [r["value"]["rectanglelabels"][0] for r in res] == record.labels


def _run(main, argv):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), f"regionclip {' '.join(argv)} exited {exc.code}"


# ----------------------------------------------------------------------------- reading corrections
def _region(x, y, w, h, name, rotation=0, size=(200, 100), kind="rectanglelabels"):
    return {"id": name, "type": kind, "from_name": "label", "to_name": "image", "original_width": size[0],
            "original_height": size[1], "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                                                  kind: [name]}}


def _export(tmp_path) -> list[dict]:
    """Label Studio's JSON export as its API gives it: per task its annotations (some older, some
    skipped) and the predictions it was imported with."""
    Image.fromarray(shapes_image(50, 40)).save(tmp_path / "empty.png")
    return [
        {"id": 1, "data": {"image": "/data/local-files/?d=im%20a.png", "priority": 0.9},
         "predictions": [{"result": [_region(0, 0, 50, 50, "bird")], "score": 0.1}],
         "annotations": [
             {"id": 11, "was_cancelled": False, "created_at": "2025-01-01T10:00:00.000000Z",
              "updated_at": "2025-01-03T10:00:00.000000Z",  # the latest: edited after 12 was made
              "result": [_region(10, 10, 20, 40, "dog"), _region(50, 0, 10, 20, "cat", rotation=90),
                         {"type": "choices", "value": {"choices": ["ok"]}, "from_name": "q", "to_name": "image"}]},
             {"id": 12, "was_cancelled": False, "created_at": "2025-01-02T10:00:00.000000Z",
              "updated_at": "2025-01-02T10:00:00.000000Z", "result": [_region(0, 0, 10, 10, "dog")]},
             {"id": 13, "was_cancelled": True, "created_at": "2025-01-04T10:00:00.000000Z",
              "updated_at": "2025-01-04T10:00:00.000000Z", "result": []}]},
        {"id": 2, "data": {"image": "/data/local-files/?d=skipped.png"},
         "annotations": [{"id": 21, "was_cancelled": True, "result": []}]},
        {"id": 3, "data": {"image": "/data/local-files/?d=unseen.png"}, "annotations": []},
        {"id": 4, "data": {"image": "/data/local-files/?d=empty.png"},
         "annotations": [{"id": 41, "was_cancelled": False, "result": []}]},  # reviewed: nothing there
    ]


def test_reads_the_latest_submitted_annotation_of_each_task(tmp_path, monkeypatch):
    from regionclip.convert import read

    monkeypatch.chdir(tmp_path)
    (tmp_path / "export.json").write_text(json.dumps(_export(tmp_path)))
    res = read(tmp_path / "export.json", image_prefix="/data/local-files/?d=")
    assert res.annotated and res.vocabulary == ["dog", "cat"]
    a, empty = res.images
    assert (a.image, a.width, a.height) == ("im a.png", 200, 100)
    assert a.labels == ["dog", "cat"]
    # 90 degrees clockwise about its top-left corner (100, 0): 20 px wide, 20 px tall, standing left of it
    np.testing.assert_allclose(a.boxes_xyxy, [[20, 10, 60, 50], [80, 0, 100, 20]], atol=1e-4)
    assert (empty.image, empty.width, empty.height, len(empty.labels)) == ("empty.png", 40, 50, 0)
    coco = json.loads(convert(res, "coco", tmp_path / "gt.json").read_text())  # instances, no scores
    assert [(im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [("im a.png", 200, 100),
                                                                                      ("empty.png", 40, 50)]
    assert [a["bbox"] for a in coco["annotations"]] == [[20, 10, 40, 40], [80, 0, 20, 20]]
    assert all("score" not in a for a in coco["annotations"]) and coco["categories"][1]["name"] == "cat"


@pytest.mark.parametrize("content, message", [
    ('[{"data": {"image": "a.png"}, "annotations": [{"result": [{"type": "rectanglelabels", "value": {}, '
     '"original_width": 10, "original_height": 10}]}]}]', "a rectanglelabels result without"),
    ('[{"data": {"image": "a.png"}, "annotations": [{"was_cancelled": true, "result": []}]}]', "no task has a submitted"),
    ('{"tasks": []}', None),
    ("[{", "not a readable"),
])
def test_a_malformed_export_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    from regionclip_cli.main import main

    (tmp_path / "e.json").write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "e.json"), "--from", "labelstudio", "--to", "coco", "--out",
              str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message is None or message in err, err
