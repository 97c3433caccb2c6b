"""regionclip convert --to yolo: a dataset folder a YOLO-format reader loads back within 1 px."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import shapes_image
from regionclip.convert import convert
from regionclip.errors import BadInput
from regionclip.records import ImageRecord, Results, load_results

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def read_yolo(root: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """A YOLO-format reader as trainers implement it: data.yaml's names, every image under its
    train folder, the label file found by swapping ``images`` for ``labels`` and the suffix for
    .txt, normalised cx cy w h scaled back to xyxy pixels by the image's own size."""
    data = yaml.safe_load((root / "data.yaml").read_text())
    base = Path(data["path"])
    names = data["names"]
    assert data["nc"] == len(names)
    out = {}
    for img in sorted((base / data["train"]).rglob("*")):
        if img.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        label = Path(str(img).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}")).with_suffix(".txt")
        with Image.open(img) as im:
            w, h = im.size
        rows = np.array([line.split() for line in label.read_text().splitlines() if line.strip()], float).reshape(-1, 5)
        cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        out[img.relative_to(base / data["train"]).as_posix()] = ([names[int(c)] for c in rows[:, 0]], boxes)
    return out


@pytest.mark.parametrize("copy", [False, True])
def test_round_trip_within_a_pixel(tmp_path, copy):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(shapes_image(97, 203)).save(tmp_path / "in" / "a.png")
    Image.fromarray(shapes_image(64, 64, seed=1)).save(tmp_path / "in" / "sub" / "b.jpg")
    boxes = np.array([[20.3, 10.1, 60.7, 50.2], [150.2, 40.5, 202.9, 96.4]], np.float32)
    res = Results([ImageRecord(str(tmp_path / "in" / "a.png"), 203, 97, boxes, ["dog", "cat"], [0.9, 0.3]),
                   ImageRecord(str(tmp_path / "in" / "sub" / "b.jpg"), 64, 64, [], [], [])],
                  vocabulary=["cat", "dog"])
    out = convert(res, "yolo", tmp_path / "ds", **({"copy_images": True} if copy else {}))
    assert (out / "images" / "a.png").is_symlink() is not copy
    assert (out / "images" / "a.png").read_bytes() == (tmp_path / "in" / "a.png").read_bytes()
    back = read_yolo(out)
    assert set(back) == {"a.png", "sub/b.jpg"}
    names, got = back["a.png"]
    assert names == ["dog", "cat"]
    np.testing.assert_allclose(got, boxes, atol=1.0)
    assert back["sub/b.jpg"][1].shape == (0, 4)  # an empty label file: a negative example
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {0: "cat", 1: "dog"}


def test_from_a_detect_json_and_missing_images(tmp_path, monkeypatch):
    from regionclip_cli.main import main

    monkeypatch.chdir(tmp_path)
    Image.fromarray(shapes_image(120, 160)).save("im0.png")
    for argv in (["detect", "im0.png", "--model", "demo", "--json", "det.json", "--workers", "0"],
                 ["convert", "det.json", "--to", "yolo", "--out", "ds", "--min-score", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code in (0, None)
    source = load_results("det.json")
    names, got = read_yolo(tmp_path / "ds")["im0.png"]
    keep = source.images[0].scores >= 0.5
    assert names == [n for n, k in zip(source.images[0].labels, keep) if k] and len(names) > 0
    np.testing.assert_allclose(got, source.images[0].boxes_xyxy[keep], atol=1.0)
    os.remove("im0.png")
    with pytest.raises(BadInput, match="image size unknown"):
        convert(load_results("det.json"), "yolo", tmp_path / "ds2")


# ----------------------------------------------------------------------------- reading corrections
def test_reads_a_yolo_dataset_back(tmp_path):
    """Our dataset read back within a pixel; then the Ultralytics layout (images/train, images/val,
    labels/ beside them, names as a list, a polygon line, an image without a label file)."""
    from regionclip.convert import read

    Image.fromarray(shapes_image(97, 203)).save(tmp_path / "a.png")
    boxes = np.array([[20.3, 10.1, 60.7, 50.2]], np.float32)
    ours = convert(Results([ImageRecord(str(tmp_path / "a.png"), 203, 97, boxes, ["dog"], [0.9])], ["cat", "dog"]),
                   "yolo", tmp_path / "ds")
    back = read(ours)
    assert back.annotated and back.vocabulary == ["cat", "dog"] and back.images[0].labels == ["dog"]
    np.testing.assert_allclose(back.images[0].boxes_xyxy, boxes, atol=1e-3)

    root = tmp_path / "ul"
    for split, names in (("train", ["t1.jpg", "t2.jpg"]), ("val", ["v1.jpg"])):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for n in names:
            Image.fromarray(shapes_image(50, 100)).save(root / "images" / split / n)
    (root / "labels" / "train" / "t1.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.3 0.1 0.2 0.5\n")
    (root / "labels" / "val" / "v1.txt").write_text("")
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                                    "names": ["car", "bus"]}))
    got = read(root / "data.yaml")
    assert [Path(r.image).name for r in got.images] == ["t1.jpg", "t2.jpg", "v1.jpg"]
    assert got.images[0].labels == ["bus", "car"] and got.images[1].labels == got.images[2].labels == []
    np.testing.assert_allclose(got.images[0].boxes_xyxy, [[40, 15, 60, 35], [10, 5, 30, 25]], atol=1e-4)
    coco = json.loads(convert(got, "coco", tmp_path / "gt.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["car", "bus"] and len(coco["images"]) == 3
    assert coco["info"]["images_dir"] == str(root / "images")


def test_a_bad_label_line_is_one_line(tmp_path, capsys):
    from regionclip_cli.main import main

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(shapes_image(20, 20)).save(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": "images", "names": {0: "cat"}}))
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path), "--to", "coco", "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "x.txt:1" in err, err
