"""regionclip convert --to cvat: a COCO 1.0 archive that round-trips through pycocotools."""

from __future__ import annotations

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
