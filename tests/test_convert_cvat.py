"""regionclip convert --to cvat: a COCO 1.0 archive that round-trips through pycocotools."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from conftest import shapes_image
from regionclip.convert import convert
from regionclip.errors import BadOutput
from regionclip.records import ImageRecord, Results


def _results(tmp_path) -> Results:
    for sub, (h, w) in (("a", (100, 200)), ("b", (80, 60))):
        (tmp_path / sub).mkdir()
        Image.fromarray(shapes_image(h, w)).save(tmp_path / sub / "x.png")
    return Results(images=[
        ImageRecord(str(tmp_path / "a" / "x.png"), 200, 100, [[20, 10, 60, 50], [150, 50, 205, 100]],
                    ["dog", "cat"], [0.9, 0.3]),
        ImageRecord(str(tmp_path / "b" / "x.png"), 60, 80, [], [], []),  # nothing found: still an image
        ImageRecord("gone.png", None, None, [], [], [], error="not an image"),
    ], vocabulary=["dog", "cat"])


def test_round_trip_through_pycocotools(tmp_path):
    out = convert(_results(tmp_path), "cvat", tmp_path / "cvat.zip")
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["annotations/instances_default.json"]
        zf.extractall(tmp_path / "unzipped")
    coco = COCO(str(tmp_path / "unzipped" / "annotations" / "instances_default.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["dog", "cat"]
    images = coco.loadImgs(coco.getImgIds())
    # same base name in two folders: told apart by the folder, as CVAT names uploaded folders' files
    assert [(i["file_name"], i["width"], i["height"]) for i in images] == [("a/x.png", 200, 100), ("b/x.png", 60, 80)]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[images[0]["id"]]))
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
    np.testing.assert_allclose(xyxy, [[20, 10, 60, 50], [150, 50, 200, 100]])  # clipped to the image
    assert [coco.cats[a["category_id"]]["name"] for a in anns] == ["dog", "cat"]
    assert [a["score"] for a in anns] == pytest.approx([0.9, 0.3])
    assert anns[0]["area"] == 1600 and anns[0]["iscrowd"] == 0
    assert coco.getAnnIds(imgIds=[images[1]["id"]]) == []


def test_min_score_and_folder_refused(tmp_path):
    res = _results(tmp_path)
    out = convert(res, "cvat", tmp_path / "c.zip", min_score=0.5)
    with zipfile.ZipFile(out) as zf:
        zf.extractall(tmp_path / "u")
    coco = COCO(str(tmp_path / "u" / "annotations" / "instances_default.json"))
    assert len(coco.anns) == 1
    with pytest.raises(BadOutput, match="is a folder"):
        convert(res, "cvat", tmp_path)


# ----------------------------------------------------------------------------- reading corrections
def test_reads_cvats_coco_zip_back(tmp_path):
    """Our archive read back gives the boxes it holds; then one as CVAT exports a task with its
    images (annotations/instances_default.json beside images/), a polygon among the boxes."""
    from regionclip.convert import read

    res = _results(tmp_path)
    back = read(convert(res, "cvat", tmp_path / "ours.zip"), images_dir=str(tmp_path))
    assert back.annotated and back.vocabulary == ["dog", "cat"]
    assert [(r.image, r.width, r.height, r.labels) for r in back.images] == [
        (str(tmp_path / "a" / "x.png"), 200, 100, ["dog", "cat"]), (str(tmp_path / "b" / "x.png"), 60, 80, [])]
    np.testing.assert_allclose(back.images[0].boxes_xyxy, [[20, 10, 60, 50], [150, 50, 200, 100]])

    export = {"licenses": [{"name": "", "id": 0, "url": ""}], "info": {"contributor": "", "version": ""},
              "categories": [{"id": 1, "name": "car", "supercategory": ""}, {"id": 2, "name": "bus", "supercategory": ""}],
              "images": [{"id": 1, "width": 64, "height": 48, "file_name": "f1.jpg", "license": 0},
                         {"id": 2, "width": 64, "height": 48, "file_name": "f2.jpg", "license": 0}],
              "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": [], "area": 50.0,
                               "bbox": [1.5, 2.0, 10.0, 5.0], "iscrowd": 0,
                               "attributes": {"occluded": False, "rotation": 0.0}},
                              {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[5, 5, 15, 5, 10, 20]],
                               "area": 75.0, "bbox": [5.0, 5.0, 10.0, 15.0], "iscrowd": 0,
                               "attributes": {"occluded": True}}]}
    with zipfile.ZipFile(tmp_path / "task.zip", "w") as zf:
        zf.writestr("annotations/instances_default.json", json.dumps(export))
        zf.writestr("images/default/f1.jpg", b"")
    coco = json.loads(convert(read(tmp_path / "task.zip"), "coco", tmp_path / "gt.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["car", "bus"]
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [("f1.jpg", 64, 48),
                                                                                 ("f2.jpg", 64, 48)]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]] == [
        (1, 2, [1.5, 2.0, 10.0, 5.0]), (1, 1, [5.0, 5.0, 10.0, 15.0])]
    COCO(str(tmp_path / "gt.json"))  # pycocotools takes it as ground truth


@pytest.mark.parametrize("member", [None, "annotations/person_keypoints_default.json"])
def test_a_zip_without_annotations_is_one_line(tmp_path, capsys, member):
    from regionclip_cli.main import main

    with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
        zf.writestr(member or "images/x.jpg", b"{}")
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "e.zip"), "--to", "coco", "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "no annotations/instances_*.json" in err, err
