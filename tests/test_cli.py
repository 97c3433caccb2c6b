"""``regionclip detect`` end to end, bad input, and the offline failure as a user meets it."""

import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_DETECTOR, shapes_image, tiny_model

from regionclip.weights import HF_HOST, host_reachable
from regionclip_cli.main import main

TINY = ["--clip-model", "test-vit-tiny", "--clip-pretrained", "none", "--detector", TINY_DETECTOR,
        "--detector-weights", "none", "--device", "cpu"]


def run(argv, capsys):
    """Run the CLI in-process (sees the tiny configs conftest registers); return (code, out, err)."""
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def img_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    cv2.imwrite(str(d / "a.jpg"), cv2.cvtColor(shapes_image(120, 160, 0), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(d / "b.png"), cv2.cvtColor(shapes_image(90, 140, 1), cv2.COLOR_RGB2BGR))
    return d


def test_detect_writes_json_and_annotated_images(img_dir, tmp_path, capsys):
    out_json, save = tmp_path / "dets.json", tmp_path / "ann"
    code, out, err = run(["detect", str(img_dir), "--labels", "red circle,green square", *TINY,
                          "--score-threshold", "0", "--json", str(out_json), "--save-dir", str(save)], capsys)
    assert code == 0, err
    records = json.loads(out_json.read_text())
    assert {r["image"] for r in records} == {str(img_dir / "a.jpg"), str(img_dir / "b.png")}
    for r in records:
        assert set(r) >= {"bbox", "score", "category_id", "label", "image"}
        assert 0 <= r["score"] <= 1 and r["label"] in ("red circle", "green square")
    assert sorted(p.name for p in save.iterdir()) == ["a.jpg", "b.jpg"]
    assert cv2.imread(str(save / "a.jpg")).shape == (120, 160, 3)
    assert "detections in 2 image(s)" in out


def test_labels_file_and_glob(img_dir, tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red circle\n\ngreen square\n")
    code, out, err = run(["detect", str(img_dir / "*.png"), "--labels-file", str(vocab), *TINY,
                          "--json", str(tmp_path / "o.json"), "--max-detections", "3", "--score-threshold", "0"], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "o.json").read_text())
    assert len(records) == 3 and all(r["image"].endswith("b.png") for r in records)


def test_bad_files_are_reported_and_skipped(img_dir, tmp_path, capsys):
    (img_dir / "empty.jpg").write_bytes(b"")
    (img_dir / "corrupt.jpg").write_bytes(b"garbage")
    out_json = tmp_path / "o.json"
    code, out, err = run(["detect", str(img_dir), str(tmp_path / "missing.jpg"), "--labels", "x", *TINY,
                          "--score-threshold", "0", "--json", str(out_json)], capsys)
    assert code != 0
    assert "empty.jpg: file is empty" in err and "corrupt.jpg: not a readable image" in err
    assert "missing.jpg: no such file" in err and "Traceback" not in err
    images = {r["image"] for r in json.loads(out_json.read_text())}
    assert images == {str(img_dir / "a.jpg"), str(img_dir / "b.png")}  # the good ones are not lost


@pytest.mark.parametrize("case,expect", [
    ("empty_labels", "no labels given"),
    ("empty_dir", "no images"),
    ("unknown_model", "unknown model 'nosuch'"),
    ("unknown_clip", "unknown CLIP architecture"),
    ("wrong_checkpoint", "does not fit CLIP"),
    ("not_a_checkpoint", "not a loadable checkpoint"),
    ("bad_override", "did you mean 'score_threshold'"),
])
def test_bad_input_gives_one_line(case, expect, img_dir, tmp_path, capsys):
    img = str(img_dir / "a.jpg")
    argv = ["detect", img, "--labels", "x", *TINY]
    if case == "empty_labels":
        argv = ["detect", img, "--labels", " , ", *TINY]
    elif case == "empty_dir":
        (tmp_path / "nothing").mkdir()
        argv = ["detect", str(tmp_path / "nothing"), "--labels", "x", *TINY]
    elif case == "unknown_model":
        argv = ["detect", img, "--labels", "x", "--model", "nosuch"]
    elif case == "unknown_clip":
        argv[argv.index("test-vit-tiny")] = "ViT-Q-99"
    elif case == "wrong_checkpoint":
        ckpt = tmp_path / "rn.pt"
        torch.save(tiny_model("rn").clip.state_dict(), ckpt)  # a ResNet checkpoint for a ViT
        argv[argv.index("--clip-pretrained") + 1] = str(ckpt)
    elif case == "not_a_checkpoint":
        ckpt = tmp_path / "junk.pt"
        ckpt.write_bytes(b"junk")
        argv[argv.index("--clip-pretrained") + 1] = str(ckpt)
    elif case == "bad_override":
        argv += ["--set", "scoring.score_treshold=0.1"]
    code, out, err = run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning")]
    assert code != 0
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err


def _cli(args, env=None, timeout=120):
    exe = [sys.executable, "-m", "regionclip_cli.main"]
    start = time.monotonic()
    proc = subprocess.run(exe + args, capture_output=True, text=True, env=env, timeout=timeout)
    return proc, time.monotonic() - start


def test_acceptance_command_random_weights(tmp_path):
    """The issue's random-weights command, as a real process (console script module)."""
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), cv2.cvtColor(shapes_image(240, 320), cv2.COLOR_RGB2BGR))
    out = tmp_path / "o.json"
    proc, _ = _cli([
        "detect", str(img), "--labels", "red circle,green square", "--clip-model", "ViT-B-32",
        "--clip-pretrained", "none", "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--detector-weights", "none", "--device", "cpu", "--score-threshold", "0", "--json", str(out),
        "--set", "proposals.num_proposals=30",  # fewer crops keep the test quick; same code path
    ])
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    assert records
    boxes = np.array([r["bbox"] for r in records])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 320 + 1e-3).all() and (boxes[:, 1] + boxes[:, 3] <= 240 + 1e-3).all()
    assert all(0 <= r["score"] <= 1 for r in records)


def _offline_env(tmp_path, hub_offline: bool):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TORCH_HOME", "XDG_CACHE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    if hub_offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.parametrize("hub_offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_default_model_offline_fails_fast_and_clearly(tmp_path, hub_offline):
    if not hub_offline and host_reachable(HF_HOST):
        pytest.skip("the hub is reachable from here: this test is about a machine without network")
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), shapes_image())
    proc, elapsed = _cli(["detect", str(img), "--labels", "dog"], env=_offline_env(tmp_path, hub_offline))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert "ViT-B-16/openai" in lines[0] and "--clip-pretrained PATH" in lines[0] and "--model demo" in lines[0]
    assert ("HF_HUB_OFFLINE" in lines[0]) == hub_offline
    # About 5 s on an idle 2-core machine, most of it importing torch; the bound leaves room for a
    # loaded CI machine while still failing on any retry loop (those take a minute or more).
    assert elapsed < 30, f"offline failure took {elapsed:.1f}s: something waits on the network"


def test_detector_weights_offline_fail_fast(tmp_path):
    if host_reachable("download.pytorch.org"):
        pytest.skip("download.pytorch.org is reachable from here")
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), shapes_image())
    proc, _ = _cli(["detect", str(img), "--labels", "dog", "--clip-model", "ViT-B-32", "--clip-pretrained", "none"],
                   env=_offline_env(tmp_path, False))
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "fasterrcnn_resnet50_fpn_v2/coco" in proc.stderr and "--detector-weights PATH" in proc.stderr


def test_help_explains(capsys):
    code, out, _ = run(["detect", "--help"], capsys)
    assert code == 0 and "--labels" in out and "--save-dir" in out and "--clip-pretrained" in out
