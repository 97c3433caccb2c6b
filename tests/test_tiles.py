"""Tiled detection (regionclip/tiles.py): the windows, boxes mapped back to image pixels, the merge
at tile borders, bounded memory on a large image, and --tile checked before any model loads."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import run_ranks

from regionclip.config import ScoringConfig
from regionclip.detections import Detections
from regionclip.errors import BadInput
from regionclip.io import LoadedImage
from regionclip.tiles import Tiling, TiledImage, check_tiling, detect_tiled, load_tiled, merge

CFG = ScoringConfig(score_threshold=0.3, nms_iou=0.5, agnostic_nms=True, agnostic_nms_iou=0.3, max_detections=100)


def test_windows_cover_the_image_with_at_least_the_overlap_asked():
    t = Tiling(320, 0.2)
    win = t.windows(1000, 2048)
    assert (win[:, 2] - win[:, 0] == 320).all() and (win[:, 3] - win[:, 1] == 320).all()  # one size: no padding
    xs, ys = sorted(set(win[:, 0].tolist())), sorted(set(win[:, 1].tolist()))
    assert xs[0] == 0 and xs[-1] + 320 == 2048 and ys[0] == 0 and ys[-1] + 320 == 1000
    assert min(np.diff(xs)) <= 256 and min(np.diff(ys)) <= 256  # neighbours share >= 64 px
    assert len(win) == len(xs) * len(ys) == 8 * 4
    assert Tiling(320).windows(200, 700).tolist() == [[0, 0, 320, 200], [190, 0, 510, 200], [380, 0, 700, 200]]
    assert not t.applies(320, 300) and t.applies(321, 300)


@pytest.mark.parametrize("args,expect", [((10, None), "at least 64"), ((None, 0.2), "needs tile"),
                                         ((320, 0.8), r"in \[0, 0.75\]"), ((320.5, None), "whole number"),
                                         ((True, None), "whole number"), ((320, -0.1), r"\[0, 0.75\]")])
def test_bad_tiling_values_are_refused(args, expect):
    with pytest.raises(BadInput, match=expect):
        check_tiling(*args)


def _blob_detector(loaded: list[LoadedImage]):
    """A stand-in for the model: every red blob of each image is a box (a cut blob gives the part
    inside the image), in that image's original pixels, as the backend returns them."""
    out = []
    for x in loaded:
        red = ((x.pixels[..., 0] > 150) & (x.pixels[..., 1] < 80)).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(red)
        (h, w), (oh, ow) = x.pixels.shape[:2], x.original_size
        boxes = torch.tensor([[s[0], s[1], s[0] + s[2], s[1] + s[3]] for s in stats[1:]], dtype=torch.float32)
        boxes = boxes.reshape(-1, 4) * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        big = (boxes[:, 2:] - boxes[:, :2]).min(dim=1).values >= 3  # what a detector at this scale can see
        d = Detections(boxes[big], torch.full((int(big.sum()),), 0.9), torch.zeros(int(big.sum()), dtype=torch.int64),
                       ("red",))
        out.append(([d], (d.boxes_xyxy, d.scores)))
    return out


def _blobs_image(h: int, w: int, boxes) -> np.ndarray:
    img = np.full((h, w, 3), 100, np.uint8)
    for x1, y1, x2, y2 in boxes:
        img[y1:y2, x1:x2] = (230, 20, 20)
    return img


def test_boxes_come_back_in_image_pixels_once_even_across_tile_borders(tmp_path):
    """Windows start at 0, 235, 469, 704 (1024 px, tile 320, 85 px overlap): objects inside one
    window, across a border, across a window's corner, wider than the overlap, and larger than a
    window each come back as one box in original pixels; from a JPEG decoded at half scale too."""
    objects = [(40, 40, 70, 60),        # inside the first window only
               (300, 100, 330, 130),    # across x = 320 and x = 235: the second window holds it whole
               (530, 540, 580, 575),    # across the corner (555, 555) of a window
               (280, 700, 420, 780),    # 140 px wide, more than the overlap: cut at 320, whole in one window
               (500, 250, 790, 270),    # 290 px wide: no window holds it; cut pieces and the whole pass
               (600, 300, 1000, 700)]   # larger than a window: the whole-image pass finds it
    img = _blobs_image(1024, 1024, objects)
    for source, max_side, atol in ((img, None, 0.01), (tmp_path / "b.jpg", 160, 4.0)):
        if isinstance(source, Path):
            cv2.imwrite(str(source), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        tiled = load_tiled(source, Tiling(320), max_side)
        assert isinstance(tiled, TiledImage) and tiled.original_size == (1024, 1024)
        result = detect_tiled(tiled, _blob_detector, [CFG], batch_size=4)
        if max_side is not None:
            assert result.pixels.shape[:2] == (512, 512)  # decoded at the scale the windows need, not 1024
        d = result.detections[0]
        got = sorted(d.boxes_xyxy.tolist())
        assert len(got) == len(objects), got
        np.testing.assert_allclose(got, sorted(objects), atol=atol)
        assert result.proposals[0].shape[1] == 4 and len(result.proposals[0]) > len(objects)


def test_merge_drops_a_cut_piece_a_neighbour_sees_whole_and_fuses_two_halves():
    """The merge alone: ``cut`` marks boxes that touch an inner tile edge. A cut half inside a
    whole box is absorbed (IoU 0.5 would not do it); two cut halves of one object become their
    union; two whole objects side by side stay two; a whole box is never grown by another."""
    boxes = torch.tensor([[100, 100, 140, 130],   # whole object
                          [100, 100, 118, 130],   # its left part, cut by an edge at 118
                          [300, 100, 360, 130],   # another object, cut by a window ending at 360
                          [310, 100, 380, 130],   # and by the next one, starting at 310
                          [500, 100, 540, 130],   # two whole neighbours, touching
                          [540, 100, 580, 130]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.95, 0.8, 0.7, 0.9, 0.85])
    cut = torch.tensor([False, True, True, True, False, False])
    d = merge(Detections(boxes, scores, torch.zeros(6, dtype=torch.int64), ("x",)), cut, CFG)
    assert sorted(d.boxes_xyxy.tolist()) == [[100, 100, 140, 130], [300, 100, 380, 130], [500, 100, 540, 130],
                                              [540, 100, 580, 130]]
    assert d.scores.tolist() == pytest.approx([0.95, 0.9, 0.85, 0.8])  # best first, the best score of each
    per_label = merge(Detections(boxes[:2], scores[:2], torch.tensor([0, 1]), ("x", "y")), cut[:2],
                      ScoringConfig(agnostic_nms=False, nms_iou=0.5, max_detections=1))
    assert len(per_label) == 1 and per_label.label_ids.tolist() == [1]  # other labels kept apart; max_detections
    one = merge(Detections(boxes[2:4], scores[2:4], torch.zeros(2, dtype=torch.int64), ("x",)), cut[2:4],
                ScoringConfig(agnostic_nms=False, nms_iou=0.5, max_detections=1))
    assert one.boxes_xyxy.tolist() == [[300, 100, 380, 130]]  # past max_detections a cut piece still grows its box


def _rss_mb(key: str) -> float:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _tile_big(rank: int, path: str, out: str) -> None:
    """In a fork: detect by tiles in a 4000 x 4000 JPEG with a stand-in model that turns each
    batch of windows into float tensors (as ``ImageBatch`` does); the peak RSS rise is written."""
    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS: the peak is ours
    start = _rss_mb("VmRSS")
    tiled = load_tiled(path, Tiling(320), 640)
    assert inspect.isgenerator(tiled.tiles(np.zeros((8, 8, 3), np.uint8)))
    seen = []

    def run(loaded):
        batch = torch.stack([torch.from_numpy(np.ascontiguousarray(x.pixels)).permute(2, 0, 1).float() / 255
                             for x in loaded]) if len({x.pixels.shape for x in loaded}) == 1 else None
        seen.append(len(loaded))
        del batch
        return [([Detections.empty(("x",))], None) for _ in loaded]

    detect_tiled(tiled, run, [CFG], batch_size=8)
    Path(out).write_text(json.dumps({"rise_mb": _rss_mb("VmHWM") - start, "windows": sum(seen) - 1}))


def test_a_large_image_is_tiled_in_bounded_memory(tmp_path):
    """4000 x 4000 at tile 320: 256 windows, which as float tensors all at once would take 315 MB
    beside the decoded image (a model batch of them far more); streamed 8 at a time, the decoded
    image (48 MB) and Pillow's buffer it is copied from are what is held."""
    path = tmp_path / "big.jpg"
    img = np.full((4000, 4000, 3), 90, np.uint8)
    img[::500, :] = 200
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    run_ranks(_tile_big, (str(path), str(tmp_path / "r.json")), nprocs=1, minutes=3)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["windows"] == 16 * 16
    assert r["rise_mb"] < 250, r


def test_detect_with_tiles_through_the_predictor(models):
    """The tiny model through ``detect(..., tile=)``: boxes inside the image, a whole number of
    passes; an image no larger than a tile runs exactly as without tiles."""
    from conftest import shapes_image

    model = models("vit", "crop")
    labels = ["red circle", "green square"]
    big = shapes_image(150, 200, seed=1)
    d = model.detect(big, labels, tile=128, score_threshold=0.0, max_detections=7)
    assert 0 < len(d) <= 7 and d.boxes_xyxy[:, 2].max() <= 200 and d.boxes_xyxy[:, 3].max() <= 150
    assert d.boxes_xyxy[:, 0].min() >= 0 and (d.scores[:-1] >= d.scores[1:]).all()
    assert d.doubt is not None and d.doubt.margins.shape == (len(d),)  # label's review order needs them
    small = shapes_image(90, 96, seed=2)
    plain, tiled = model.detect(small, labels, score_threshold=0.0), model.detect(small, labels, tile=96, score_threshold=0.0)
    torch.testing.assert_close(tiled.boxes_xyxy, plain.boxes_xyxy)
    torch.testing.assert_close(tiled.scores, plain.scores)
    with pytest.raises(BadInput, match="given boxes"):
        model.detect(big, labels, boxes=[[0, 0, 10, 10]], tile=96)


@pytest.mark.parametrize("argv,expect", [
    (["detect", "IMG", "--tile", "10"], "--tile must be at least 64 pixels"),
    (["detect", "IMG", "--tile-overlap", "0.3"], "--tile-overlap needs --tile"),
    (["eval", "--annotations", "GT", "--images", "DIR", "--tile", "320", "--tile-overlap", "0.9"], "--tile-overlap must be"),
    (["label", "IMG", "--out", "OUT", "--tile", "32"], "--tile must be at least 64"),
    (["label", "IMG", "--out", "OUT", "--tile", "320", "--embeddings"], "--embeddings embeds each box"),
])
def test_bad_tile_flags_are_one_line_before_the_model_loads(argv, expect, tmp_path, capsys, monkeypatch):
    import regionclip_cli.options as O
    from test_cli import run

    monkeypatch.setattr(O, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "gt.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
                                                  "annotations": [], "categories": [{"id": 1, "name": "dog"}]}))
    where = {"IMG": str(tmp_path / "a.jpg"), "GT": str(tmp_path / "gt.json"), "DIR": str(tmp_path),
             "OUT": str(tmp_path / "out")}
    code, out, err = run([where.get(a, a) for a in argv] + ["--model", "demo"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err and "Traceback" not in err, (code, err)


def test_make_shapes_draws_small_objects_in_large_images(tmp_path):
    from regionclip.data import make_shapes

    paths = make_shapes(tmp_path / "s", n_train=0, n_val=2, seed=4, image_size=(640, 640), captions_per_image=0,
                        object_size=(12, 40), max_objects=30)
    coco = json.loads(paths["val_annotations"].read_text())
    sides = [max(a["bbox"][2:]) for a in coco["annotations"]]
    assert len(sides) > 10 and 10 <= min(sides) and max(sides) <= 41, sides
    assert coco["info"]["object_size"] == [12, 40] and coco["info"]["max_objects"] == 30
    with pytest.raises(BadInput, match="object_size"):
        make_shapes(tmp_path / "t", n_train=0, n_val=1, object_size=(40, 12))
