"""regionclip convert --to yolo: a dataset folder a YOLO-format reader loads back within 1 px."""

from __future__ import annotations

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
