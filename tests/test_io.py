import numpy as np
import pytest
import torch
from PIL import Image

from regionclip.errors import BadImage
from regionclip.io import expand_inputs, load_image, to_tensor


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # white strip on the left of a 40-wide image
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    out = load_image(path)
    assert out.shape == (40, 20, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # strip is now at the top


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_modes_become_rgb_uint8(tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
    elif mode == "P":
        img = Image.new("RGB", (30, 20), (200, 10, 10)).convert("P")
    elif mode == "RGBA":
        img = Image.new("RGBA", (30, 20), (0, 0, 255, 0))
    else:
        img = Image.new("L", (30, 20), 128)
    path = tmp_path / "x.png"
    img.save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    if mode == "RGBA":
        assert out.min() == 255  # fully transparent -> white background
    if mode == "I;16":
        assert out.max() > 200  # 16-bit range scaled, not clipped to black/white


def test_arrays_tensors_and_pil():
    arr = np.random.default_rng(0).integers(0, 255, (8, 9, 3), dtype=np.uint8)
    assert (load_image(arr) == arr).all()
    assert (load_image(Image.fromarray(arr)) == arr).all()
    chw = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert np.abs(load_image(chw).astype(int) - arr).max() <= 1
    assert load_image(arr[..., 0]).shape == (8, 9, 3)
    t = to_tensor(arr)
    assert t.shape == (3, 8, 9) and t.dtype == torch.float32 and float(t.max()) <= 1


def test_bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(BadImage, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(BadImage, match="empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(BadImage, match="not a readable image"):
        load_image(tmp_path / "corrupt.jpg")
    with pytest.raises(BadImage, match="shape"):
        load_image(np.zeros((2, 3, 5)))


def test_expand_inputs(tmp_path):
    for name in ["b.png", "a.jpg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty_dir").mkdir()
    paths, problems = expand_inputs([str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "empty_dir"), "nope.jpg"])
    assert [p.name for p in paths] == ["a.jpg", "b.png"]  # directory sorted, glob duplicate dropped
    assert len(problems) == 2 and "no images" in problems[0] and "no such file" in problems[1]


def test_a_file_named_relative_and_absolute_is_one_input(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    paths, _ = expand_inputs(["a.jpg", str(tmp_path / "a.jpg"), "./a.jpg"])
    assert [str(p) for p in paths] == ["a.jpg"]


def test_atomic_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """A crash after the rename must not leave an empty file: the temporary is fsynced before
    ``os.replace`` and its folder after."""
    import os

    import regionclip.atomic as A

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(A.os, "fsync", fsync)
    monkeypatch.setattr(A.os, "replace", replace)
    target = tmp_path / "out.json"
    A.atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".out.json.")) and events[2][1] == str(tmp_path)
