"""Large images: decoded only at the resolution the stages use, boxes still in original pixels."""

import json
import re
from pathlib import Path

import numpy as np
import torch
from conftest import run_ranks
from PIL import Image, ImageDraw

from regionclip.io import load_reduced


def _rss_mb(key: str) -> float:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _detect_big(rank: int, model, path: str, out: str) -> None:
    """In a fork of the test process: detect on ``path``, proposed and given boxes, and how far
    the peak RSS rose above the RSS the fork began with (the worker's pages are shared, not new).
    Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+): the peak is detect's."""
    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")
    start = _rss_mb("VmRSS")
    given = [[100.0, 200.0, 5000.0, 6000.0], [0.0, 0.0, 10000.0, 8000.0]]
    dets = model.detect(path, ["red circle", "green square"], score_threshold=0.0)
    classified = model.detect(path, ["red circle", "green square"], boxes=given)
    Path(out).write_text(json.dumps({"rise_mb": _rss_mb("VmHWM") - start, "input_max_side": model.input_max_side,
                                     "boxes": dets.boxes_xyxy.tolist(), "given": classified.boxes_xyxy.tolist()}))


def _big_jpeg(path: Path, w: int, h: int) -> None:
    img = Image.new("RGB", (w, h), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    draw.ellipse((w // 8, h // 8, w // 2, h // 2), fill=(230, 20, 20))
    draw.rectangle((w * 5 // 8, h // 2, w * 7 // 8, h * 7 // 8), fill=(20, 220, 20))
    img.save(path, quality=85)


def test_a_100_megapixel_jpeg_stays_small_in_memory(tmp_path, models):
    path = tmp_path / "big.jpg"
    _big_jpeg(path, 10000, 10000)
    run_ranks(_detect_big, (models("vit", "crop"), str(path), str(tmp_path / "r.json")), nprocs=1, minutes=5)
    r = json.loads((tmp_path / "r.json").read_text())
    # Decoding at full size rose 3.8 GB above the fork's RSS (10000 x 10000 x 3 uint8, then floats
    # and copies; 9.3 GB in a fresh process for 108 MP before the fix); reduced decoding rose 0.18 GB.
    assert r["rise_mb"] < 800, r["rise_mb"]
    boxes = np.array(r["boxes"])
    assert len(boxes) and boxes.min() >= 0 and boxes.max() <= 10000
    assert boxes[:, 2].max() > r["input_max_side"]  # proposals came back scaled to original pixels
    np.testing.assert_allclose(r["given"], [[100, 200, 5000, 6000], [0, 0, 10000, 8000]], atol=1e-2)


def test_draft_decoding_keeps_the_original_size_and_exif_rotation(tmp_path):
    arr = np.zeros((600, 1000, 3), np.uint8)
    arr[:, :200] = 255  # a white strip on the left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 1000 high, 600 wide
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_reduced(tmp_path / "rot.jpg", max_side=250)
    assert loaded.original_size == (1000, 600)
    assert max(loaded.pixels.shape[:2]) == 250 and loaded.pixels.shape[0] > loaded.pixels.shape[1]
    assert loaded.pixels[:20].mean() > 200  # the strip is on top after rotation
    full = load_reduced(tmp_path / "rot.jpg")
    assert full.pixels.shape[:2] == (1000, 600) and full.original_size == (1000, 600)
    small = load_reduced(np.zeros((50, 80, 3), np.uint8), max_side=40)
    assert small.pixels.shape[:2] == (25, 40) and small.original_size == (50, 80)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h pixels (its header) without holding them: what the decoder
    learns before it decodes, and nothing to spend a test's time on."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_200_megapixel_png_is_refused_with_one_line_before_decoding(tmp_path, capsys, monkeypatch):
    """Only JPEGs decode reduced: a 200 MP PNG would decode whole (600 MB and more). It is refused
    from its header with one line naming its size and the setting that raises the budget;
    raised, the decoder is tried (this file then fails as what it is, a truncated PNG)."""
    import pytest
    from test_cli import run

    from regionclip.errors import BadImage

    path = tmp_path / "huge.png"
    _png_header_only(path, 20_000, 10_000)
    with pytest.raises(BadImage, match=r"20000x10000 \(200 MP\) PNG is above .* REGIONCLIP_MAX_PIXELS"):
        load_reduced(path, 800)
    code, out, err = run(["detect", str(path), "--labels", "dog", "--model", "demo"], capsys)
    assert code != 0 and "REGIONCLIP_MAX_PIXELS" in err and "Traceback" not in err + out, (code, err)
    monkeypatch.setenv("REGIONCLIP_MAX_PIXELS", "300000000")
    with pytest.raises(BadImage, match="not a readable image"):
        load_reduced(path, 800)


def test_labels_and_vocabulary_files_that_are_not_utf8_are_one_line(tmp_path, capsys):
    from test_cli import run

    bad = tmp_path / "labels.txt"
    bad.write_bytes(b"dog\n\xff\xfecat\n")
    (tmp_path / "gt.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "width": 8, "height": 8}],
                                                  "annotations": [], "categories": [{"id": 1, "name": "dog"}]}))
    for argv in (["detect", str(tmp_path / "x.jpg"), "--labels-file", str(bad)],
                 ["eval", "--annotations", str(tmp_path / "gt.json"), "--images", str(tmp_path), "--vocabulary", str(bad)]):
        code, out, err = run(argv, capsys)
        assert code == 2 and f"{bad}: the " in err and "not UTF-8" in err and len(err.strip().splitlines()) == 1, err
