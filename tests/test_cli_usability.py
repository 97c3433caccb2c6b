"""What a new user met at the command line (issue 21): make-shapes over a folder, --model on a
training folder, output cut at 80 columns when piped, warnings nobody can act on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import yaml
from conftest import shapes_image, tiny_model
from test_cli import run

SMALL = ["--train", "1", "--val", "1", "--min-side", "64", "--max-side", "64", "--captions-per-image", "0"]


def test_make_shapes_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(["make-shapes", str(out), *SMALL], capsys)
    assert code != 0 and "not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert "overwrite=True" not in err  # the flag the command takes, not the function's keyword
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing drawn
    code, _, err = run(["make-shapes", str(out), *SMALL, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "annotations" / "instances_train.json").is_file() and (out / "notes.txt").read_text() == "mine"
    code, _, err = run(["make-shapes", str(tmp_path / "new"), *SMALL], capsys)  # a new folder needs no flag
    assert code == 0, err


def test_every_install_in_the_docs_is_editable():
    """Presets are read from the checkout: after a plain ``pip install .`` ``--model demo`` fails."""
    import re

    root = Path(__file__).resolve().parent.parent
    plain = [f"{md.name}: {line.strip()}" for md in (root / "README.md", *sorted((root / "docs").glob("*.md")))
             for line in md.read_text().splitlines() if re.search(r"pip install (?!-e )[\"']?\.", line)]
    assert not plain, plain


def test_help_at_80_columns_prints_every_option_name_whole(capsys, monkeypatch):
    """rich shrank the widest columns alike: at 80 columns ``--score-thresho…``. Now only the help
    text wraps (its long words folded), and each option's name leads a row of its panel whole."""
    import re

    import typer

    from regionclip_cli.main import app

    monkeypatch.setenv("COLUMNS", "80")
    for name, command in typer.main.get_command(app).commands.items():
        code, out, err = run([name, "--help"], capsys)
        assert code == 0, err
        shown = re.findall(r"^│ (?:[* ]  )?(--\S+)", out, re.M)  # the name column, not the help text's flags
        wanted = [opt for param in command.params for opt in param.opts[:1] if opt.startswith("--")] + ["--help"]
        assert shown == wanted and "…" not in out, (name, set(shown) ^ set(wanted))


def test_the_front_page_table_lists_every_page_of_the_nav():
    import re

    root = Path(__file__).resolve().parent.parent
    nav = {next(iter(entry.values())) for entry in yaml.safe_load((root / "mkdocs.yml").read_text())["nav"]}
    table = set(re.findall(r"^\| \[[^]]+\]\(([\w-]+\.md)\)", (root / "docs" / "index.md").read_text(), re.M))
    assert table == nav - {"index.md"}


def test_the_demo_output_folder_is_ignored_by_git():
    """``regionclip demo --out demo/`` (the getting-started command) writes into the checkout."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    check = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "demo/detections.png"])
    assert check.returncode == 0, "demo/ is not in .gitignore"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished training run's folder as ``regionclip train`` leaves it: model.pt + preset.yaml."""
    from regionclip.config import to_dict

    folder = tmp_path_factory.mktemp("run")
    model = tiny_model(seed=3)
    model.save(folder / "model.pt")
    preset = to_dict(model.cfg)
    preset["checkpoint"] = str(folder / "model.pt")
    (folder / "preset.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    return folder


@pytest.fixture
def one_image(tmp_path) -> Path:
    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(shapes_image(64, 80, 0), cv2.COLOR_RGB2BGR))
    return path


def test_model_option_takes_a_training_runs_folder(run_folder, one_image, tmp_path, capsys):
    """--model runs/x is runs/x/preset.yaml (it used to be read as an ONNX export and fail)."""
    for model in (run_folder, run_folder / "preset.yaml"):
        code, out, err = run(["detect", str(one_image), "--model", str(model), "--labels", "red circle",
                              "--score-threshold", "0", "--json", str(tmp_path / "d.json")], capsys)
        assert code == 0, err
        assert "onnx" not in (out + err).lower()
        records = json.loads((tmp_path / "d.json").read_text())
        assert records and all(r["label"] == "red circle" for r in records)


def test_model_option_on_another_folder_says_what_it_should_hold(tmp_path, one_image, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(["detect", str(one_image), "--model", str(tmp_path / "empty"), "--labels", "x"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "preset.yaml" in err and "manifest.json" in err and "Traceback" not in err
    unfinished = tmp_path / "unfinished" / "boxes"  # a staged run stopped in its first stage
    unfinished.mkdir(parents=True)
    (unfinished / "last.pt").write_bytes(b"")
    code, _, err = run(["detect", str(one_image), "--model", str(unfinished.parent), "--labels", "x"], capsys)
    assert code != 0 and "not finished" in err and "--resume" in err and len(err.strip().splitlines()) == 1, err


def test_piped_tables_keep_long_image_paths_whole(tmp_path, capsys):
    """Output to a pipe was cut at 80 columns: image names lost their file name to '…'."""
    from test_cli import TINY

    folder = tmp_path / ("a_folder_with_a_rather_long_name_" * 3)
    folder.mkdir()
    path = folder / "an_image_whose_name_alone_is_longer_than_forty_characters.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(shapes_image(64, 80, 0), cv2.COLOR_RGB2BGR))
    code, out, err = run(["detect", str(path), "--labels", "red circle", *TINY, "--score-threshold", "0",
                          "--max-detections", "2"], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if path.name in line]
    assert len(rows) >= 2 and "…" not in out, out  # the detections table and the per-image table


def test_no_warnings_users_cannot_act_on(models):
    """A read-only array (np.asarray of a PIL image) warned 'not writable'; the learned temperature
    warned 'requires_grad ... to a scalar' whenever logits ran outside inference mode."""
    import warnings

    import numpy as np
    import torch
    from PIL import Image

    model = models("vit")
    pixels = np.asarray(Image.fromarray(shapes_image(64, 80, 0)))
    assert not pixels.flags.writeable
    learned = tiny_model(scoring={"logit_scale": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.detect([pixels, pixels], ["red circle"])
        learned.logits(torch.randn(3, 32), torch.nn.functional.normalize(torch.randn(2, 32), dim=-1))
