"""``regionclip detect`` end to end, bad input, and the offline failure as a user meets it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    assert sorted(p.name for p in save.iterdir()) == ["a.jpg", "b.png"]  # PNG stays PNG
    assert cv2.imread(str(save / "a.jpg")).shape == (120, 160, 3)
    assert "detections in 2 image(s)" in out
    # COCO results: image_id is the position in the input order, category_id the 1-based label position.
    assert {(r["image"], r["image_id"]) for r in records} == {(str(img_dir / "a.jpg"), 0), (str(img_dir / "b.png"), 1)}
    assert all(r["category_id"] == ["red circle", "green square"].index(r["label"]) + 1 for r in records)


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


def test_no_readable_input_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A file that is not an image, or a PNG refused from its header as too large: one line, no
    tables, the model never built (as for a missing file)."""
    import regionclip_cli.options as O
    from test_large_images import _png_header_only

    monkeypatch.setattr(O, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    fake, big = tmp_path / "fake.jpg", tmp_path / "big.png"
    fake.write_text("not an image")
    _png_header_only(big, 20_000, 15_000)
    for inputs, expect in (([fake], "fake.jpg: not a readable image"), ([big], "300 MP) PNG is above"),
                           ([fake, big], "no image can be read: ")):
        code, out, err = run(["detect", *map(str, inputs), "--labels", "dog", *TINY], capsys)
        assert code == 3 and out == "" and len(err.strip().splitlines()) == 1 and expect in err, (code, out, err)


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


def test_presets_missing_say_the_install_was_not_editable(img_dir, tmp_path, capsys, monkeypatch):
    """``pip install .`` (not -e) leaves configs/ behind: the error says so, not "use a preset ()"."""
    import regionclip.config

    monkeypatch.setattr(regionclip.config, "configs_dir", lambda: tmp_path / "site-packages" / "configs")
    code, out, err = run(["detect", str(img_dir / "a.jpg"), "--labels", "x", "--model", "demo"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unknown model 'demo': no presets found" in err and "pip install -e . from the repository" in err


def _cli(args, env=None, timeout=120):
    exe = [sys.executable, "-m", "regionclip_cli.main"]
    start = time.monotonic()
    proc = subprocess.run(exe + args, capture_output=True, text=True, env=env, timeout=timeout)
    return proc, time.monotonic() - start


def test_acceptance_command_random_weights(tmp_path, capsys):
    """The issue's random-weights command (in-process: the real-process start-up is checked by
    the offline test below, and importing open_clip in a fresh process costs ~8 s)."""
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), cv2.cvtColor(shapes_image(240, 320), cv2.COLOR_RGB2BGR))
    out = tmp_path / "o.json"
    code, _, err = run([
        "detect", str(img), "--labels", "red circle,green square", "--clip-model", "ViT-B-32",
        "--clip-pretrained", "none", "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--detector-weights", "none", "--device", "cpu", "--score-threshold", "0", "--json", str(out),
        "--set", "proposals.num_proposals=12",  # fewer crops keep the test quick; same code path
    ], capsys)
    assert code == 0, err
    records = json.loads(out.read_text())
    assert records
    boxes = np.array([r["bbox"] for r in records])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 320 + 1e-3).all() and (boxes[:, 1] + boxes[:, 3] <= 240 + 1e-3).all()
    assert all(0 <= r["score"] <= 1 for r in records)


def _offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TORCH_HOME", "XDG_CACHE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    return env


def test_default_model_offline_fails_fast_and_clearly(tmp_path):
    """A real process, as a user meets it: start-up included, one line, within seconds."""
    if host_reachable(HF_HOST):
        pytest.skip("the hub is reachable from here: this test is about a machine without network")
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), shapes_image())
    proc, elapsed = _cli(["detect", str(img), "--labels", "dog"], env=_offline_env(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert "ViT-B-16/openai" in lines[0] and "--clip-pretrained PATH" in lines[0] and "--model demo" in lines[0]
    assert "HF_HUB_OFFLINE" not in lines[0]
    # About 8 s on an idle 2-core machine, most of it importing torch and open_clip; the bound
    # leaves room for a loaded CI machine while still failing on any retry loop (a minute or more).
    assert elapsed < 45, f"offline failure took {elapsed:.1f}s: something waits on the network"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """In-process runs see no cached weights: an empty torch hub and an empty CLIP cache."""
    import regionclip.weights as W

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(W, "_cached_clip_file", lambda cfg, cache_dir: None)


def test_hub_offline_is_named_and_nothing_is_probed(tmp_path, capsys, monkeypatch, empty_caches):
    import regionclip.weights as W

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(W, "host_reachable", lambda *a, **k: pytest.fail("probed the network"))
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), shapes_image())
    code, _, err = run(["detect", str(img), "--labels", "dog"], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    assert "ViT-B-16/openai" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0] and "--model demo" in lines[0]


def test_detector_weights_offline_fail_fast(tmp_path, capsys, empty_caches):
    if host_reachable("download.pytorch.org"):
        pytest.skip("download.pytorch.org is reachable from here")
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), shapes_image())
    code, _, err = run(["detect", str(img), "--labels", "dog", "--clip-model", "ViT-B-32", "--clip-pretrained", "none"],
                       capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "fasterrcnn_resnet50_fpn_v2/coco" in err and "--detector-weights PATH" in err


def test_help_explains(capsys):
    code, out, _ = run(["detect", "--help"], capsys)
    assert code == 0 and "--labels" in out and "--save-dir" in out and "--clip-pretrained" in out


# ---- issue 15: outputs, numbers, save-dir layout, help, start-up ---------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model (or training, or drawing shapes) starts: the checks must come first."""
    import regionclip.data.shapes
    import regionclip.train
    from regionclip.detector import RegionCLIP

    def built(*args, **kwargs):
        raise AssertionError("the long work started before the check")

    monkeypatch.setattr(RegionCLIP, "__init__", built)
    monkeypatch.setattr(regionclip.train, "train", built)
    monkeypatch.setattr(regionclip.data.shapes, "render_shapes_image", built)


def _one_error_line(code, err, expect):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning")]
    assert code != 0 and "Traceback" not in err, err
    assert len(lines) == 1 and expect in lines[0], err


@pytest.mark.parametrize("command,expect", [
    ("detect --json PROC/x.json", "--json /proc/x.json: cannot create files in /proc"),
    ("detect --json DIR", "--json DIR is a folder"),
    ("detect --save-dir FILE", "--save-dir FILE is a file, not a folder"),
    ("detect --save-dir PROC/ann", "--save-dir /proc/ann: cannot create folders in /proc"),
    ("demo --out FILE", "--out FILE is a file, not a folder"),
    ("demo --out PROC/demo", "cannot create folders in /proc"),
    ("train CONFIG --out FILE", "--out FILE is a file, not a folder"),
    ("make-shapes FILE --train 1 --val 1", "FILE is a file, not a folder"),
    ("make-shapes PROC/shapes --train 1 --val 1", "cannot create folders in /proc"),
    ("eval --annotations GT --images IMGS --json DIR", "--json DIR is a folder"),
    ("eval --annotations GT --images IMGS --results-out PROC/r.json", "--results-out /proc/r.json: cannot create files"),
    ("bench --json DIR", "--json DIR is a folder"),
])
def test_wrong_output_paths_fail_before_the_work(command, expect, img_dir, tmp_path, capsys, no_model):
    if "PROC" in command and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc")
    a_file, a_dir = tmp_path / "taken.txt", tmp_path / "taken"
    a_file.write_text("x")
    a_dir.mkdir()
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 160, "height": 120}],
                              "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    config = Path(__file__).resolve().parent.parent / "configs" / "train" / "shapes_demo.yaml"
    subst = {"PROC": "/proc", "DIR": str(a_dir), "FILE": str(a_file), "GT": str(gt), "IMGS": str(img_dir),
             "CONFIG": str(config)}
    argv = [subst.get(w, w) for w in command.split()]
    argv = [a.replace("PROC/", "/proc/") for a in argv]
    if argv[0] == "detect":
        argv[1:1] = [str(img_dir / "a.jpg"), "--labels", "x"]
    if argv[0] in ("detect", "eval", "bench"):
        argv += TINY
    code, out, err = run(argv, capsys)
    _one_error_line(code, err, expect.replace("DIR", str(a_dir)).replace("FILE", str(a_file)))
    assert code == 2 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["imgs", "taken.txt", "taken", "gt.json"])  # nothing written


@pytest.mark.parametrize("flag,value,expect", [
    ("--batch-size", "0", "--batch-size must be at least 1, but got 0"),
    ("--score-threshold", "2", "--score-threshold must be in [0, 1], but got 2.0"),
    ("--nms-iou", "-1", "--nms-iou must be in [0, 1], but got -1.0"),
    ("--max-detections", "0", "--max-detections must be at least 1, but got 0"),
    ("--top-k", "0", "--top-k must be at least 1, but got 0"),
    ("--set", "scoring.score_threshold=1.5", "score_threshold must be in [0, 1], but got 1.5"),
])
def test_bad_numbers_fail_before_the_model(flag, value, expect, img_dir, capsys, no_model):
    code, out, err = run(["detect", str(img_dir), "--labels", "x", *TINY, flag, value], capsys)
    _one_error_line(code, err, expect)
    assert code == 2


@pytest.mark.parametrize("flag,value,expect", [("--batch-size", "0", "--batch-size must be at least 1"),
                                                 ("--top-k", "0", "--top-k must be at least 1"),
                                                 ("--proposals", "boxes", "--proposals must be 'model' or 'gt'")])
def test_eval_bad_numbers_fail_before_the_model(flag, value, expect, img_dir, tmp_path, capsys, no_model):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    code, out, err = run(["eval", "--annotations", str(gt), "--images", str(img_dir), *TINY, flag, value], capsys)
    _one_error_line(code, err, expect)


def test_save_dir_keeps_inputs_with_one_name_apart(tmp_path, capsys):
    for sub, seed in (("x", 0), ("y", 1)):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "a.jpg"), cv2.cvtColor(shapes_image(60, 80, seed), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "y" / "b.png"), cv2.cvtColor(shapes_image(60, 80, 2), cv2.COLOR_RGB2BGR))
    save = tmp_path / "ann"
    code, out, err = run(["detect", str(tmp_path / "x"), str(tmp_path / "y"), "--labels", "red circle", *TINY,
                          "--score-threshold", "0", "--save-dir", str(save)], capsys)
    assert code == 0, err
    written = sorted(str(p.relative_to(save)) for p in save.rglob("*") if p.is_file())
    assert written == ["x/a.jpg", "y/a.jpg", "y/b.png"]  # 3 inputs, 3 files
    assert "x/a.jpg" in out and "y/a.jpg" in out and "ms" in out  # paths users can tell apart, per-image time
    assert [ln.split()[1] for ln in out.splitlines() if "80x60" in ln] == ["x/a.jpg", "y/a.jpg", "y/b.png"]


def test_detect_from_the_inputs_parent_folder_without_save_dir(img_dir, capsys, monkeypatch):
    monkeypatch.chdir(img_dir.parent)
    code, out, err = run(["detect", "imgs", "--labels", "x", *TINY, "--score-threshold", "0"], capsys)
    assert code == 0, err


def test_save_dir_on_the_input_folder_is_refused(img_dir, capsys, no_model):
    code, out, err = run(["detect", str(img_dir), "--labels", "x", *TINY, "--save-dir", str(img_dir)], capsys)
    _one_error_line(code, err, "would overwrite input")


@pytest.mark.parametrize("flag,expected", [([], True), (["--no-agnostic-nms"], False), (["--agnostic-nms"], True)])
def test_agnostic_nms_flag_reaches_detect(flag, expected, img_dir, capsys, monkeypatch):
    from regionclip.predictor import Predictor

    seen, original = [], Predictor.stream

    def spy(self, *args, **kwargs):
        seen.append(self.scoring_config(**{k: v for k, v in kwargs.items() if k == "agnostic_nms"}).agnostic_nms)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "stream", spy)
    code, out, err = run(["detect", str(img_dir / "a.jpg"), "--labels", "x,y", *TINY, *flag], capsys)
    assert code == 0, err
    assert seen == [expected]


def _plain(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def test_help_shows_flags_as_flags_and_the_defaults(capsys):
    code, out, _ = run(["detect", "--help"], capsys)
    text = _plain(out)
    assert code == 0 and "<bool>" not in out
    assert "--agnostic-nms --no-agnostic-nms" in text
    for default in ("0.05 unless it sets one", "auto unless it sets one", "fp32 unless it sets one",
                    "crop unless it sets one", "0.5 unless it sets one"):
        assert default in text, default
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "<bool>" not in out


def test_cli_starts_without_importing_torch():
    """`regionclip --help` was ~5 s, most of it importing torch before parsing."""
    probe = ("import sys\n"
             "from regionclip_cli.main import main\n"
             "for argv in (['--help'], ['detect', '--help'], ['eval', '--help'], ['train', '--help']):\n"
             "    try:\n"
             "        main(argv)\n"
             "    except SystemExit as exc:\n"
             "        assert exc.code in (0, None), exc.code\n"
             "heavy = sorted(m for m in ('torch', 'torchvision', 'open_clip', 'cv2', 'pycocotools') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
