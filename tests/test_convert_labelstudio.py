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
    assert pred["model_version"] == "demo" and pred["score"] == pytest.approx(0.55)
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
