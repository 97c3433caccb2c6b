"""Drawing detections: tag layout (pure geometry), drawing from any image input, saving safely."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from regionclip import Detections
from regionclip.errors import BadOutput
from regionclip.visualize import draw_detections, layout_tags, save_annotated

H, W = 288, 384  # the demo picture's size
TAG = (90, 16)  # a "yellow square 0.97" tag at the default 12 px font


def _inside(rect, h=H, w=W) -> bool:
    x1, y1, x2, y2 = rect
    return 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _dets(boxes, scores, label_ids, vocabulary=("red circle", "yellow square", "red triangle")) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float), torch.tensor(scores, dtype=torch.float),
                      torch.tensor(label_ids, dtype=torch.int64), vocabulary)


def test_two_overlapping_boxes_get_tags_that_do_not_overlap():
    boxes = [[200, 60, 260, 110], [205, 62, 255, 105]]  # IoU ~0.7, tags would land on one spot
    a, b = layout_tags(boxes, [TAG, TAG], (H, W))
    assert not _overlap(a, b), (a, b)
    assert a == (200, 60 - TAG[1], 200 + TAG[0], 60), "the best box keeps the spot above it"
    assert _inside(a) and _inside(b)


def test_tag_of_a_box_at_the_top_right_corner_stays_inside():
    boxes = [[330, 0, W, 40], [W - 5, -10, W + 20, 10]]  # touching, and leaving, the top-right edge
    rects = layout_tags(boxes, [TAG, TAG], (H, W))
    for rect in rects:
        assert _inside(rect), rect
    assert rects[0][2] == W and rects[0][1] == 0, "clamped into the corner, not pushed away"
    assert not _overlap(*rects)


def test_five_overlapping_boxes_all_tags_inside_and_apart():
    rng = np.random.default_rng(0)
    base = np.array([300, 5, 380, 80], dtype=float)  # near the top-right, where tags get squeezed
    boxes = [base + rng.uniform(-8, 8, 4) for _ in range(5)]
    sizes = [(int(rng.integers(60, 110)), 16) for _ in range(5)]
    rects = layout_tags(boxes, sizes, (H, W))
    assert all(_inside(r) for r in rects), rects
    for a, b in itertools.combinations(rects, 2):
        assert not _overlap(a, b), (a, b, rects)
    assert [(r[2] - r[0], r[3] - r[1]) for r in rects] == sizes


def test_tags_overlap_only_when_the_image_is_full():
    rects = layout_tags([[0, 0, 40, 20]] * 3, [(40, 20)] * 3, (20, 40))  # room for one tag only
    assert all(_inside(r, 20, 40) for r in rects)
    assert rects[0] == (0, 0, 40, 20)


def test_draw_accepts_paths_pil_and_arrays_and_leaves_the_input_alone(tmp_path):
    img = np.full((H, W, 3), 120, np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    dets = _dets([[330, 0, W, 40], [20, 30, 120, 140]], [0.9, 0.5], [0, 1])
    from_array = draw_detections(img, dets)
    assert (img == 120).all(), "the input array must not be drawn on"
    assert from_array.shape == (H, W, 3) and from_array.dtype == np.uint8
    assert (from_array != 120).any(axis=2).sum() > 500  # boxes and two tags
    np.testing.assert_array_equal(draw_detections(tmp_path / "in.png", dets), from_array)
    np.testing.assert_array_equal(draw_detections(Image.fromarray(img), dets), from_array)
    np.testing.assert_array_equal(draw_detections(img, dets[:0]), img)


@pytest.mark.parametrize("name", ["out.png", "sub/dir/out.jpg"])
def test_save_annotated_writes_png_and_jpg(tmp_path, name):
    img = np.full((96, 128, 3), 200, np.uint8)
    dets = _dets([[10, 10, 60, 50]], [0.8], [2])
    path = save_annotated(tmp_path / name, img, dets)
    assert path == tmp_path / name
    with Image.open(path) as saved:
        assert saved.format == ("PNG" if name.endswith(".png") else "JPEG") and saved.size == (128, 96)
        if saved.format == "PNG":  # lossless: exactly what draw_detections returns
            np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), draw_detections(img, dets))
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left behind"


def test_save_annotated_rejects_unwritable_paths_with_a_typed_error(tmp_path):
    img, dets = np.zeros((64, 64, 3), np.uint8), _dets([[1, 1, 20, 20]], [0.9], [0])
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.jpg").mkdir()
    cases = {
        tmp_path / "folder.jpg": "folder",
        tmp_path / "a_file" / "out.jpg": "a_file",
        tmp_path / "out.txt": "extension",
    }
    if os.path.isdir("/proc/self"):  # a virtual file system: os.access says yes even to root
        cases[os.path.join("/proc", "regionclip-test.jpg")] = "proc"
    for path, words in cases.items():
        with pytest.raises(BadOutput, match=words):
            save_annotated(path, img, dets)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BadOutput, match="locked"):
            save_annotated(locked / "out.png", img, dets)
