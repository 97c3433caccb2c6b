"""Training configs as a user meets them (issue 21): relative paths from any folder, --set into a
stage, --stages, and --resume that never silently starts afresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from regionclip.config import to_dict
from regionclip.errors import BadConfig
from regionclip.train.config import load_train_config, resolve_resume, stage_config
from regionclip.train.overrides import unreached_overrides
from regionclip.train.state import load_checkpoint
from test_cli import run
from test_train import tiny_config

CHECKOUT = Path(__file__).resolve().parents[1]


# --- relative paths --------------------------------------------------------------------------


def test_shipped_config_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(CHECKOUT / "configs" / "train" / "shapes_demo.yaml")
    assert cfg.data.split == str(CHECKOUT / "configs" / "splits" / "shapes.yaml")
    assert cfg.data.train_annotations == str(CHECKOUT / "data" / "shapes" / "annotations" / "instances_train.json")
    assert cfg.out_dir == "runs/demo"  # outputs stay where the user runs the command


def test_inputs_resolve_beside_the_config_then_at_the_project_root(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    (project / "data").mkdir()
    (project / "data" / "train.json").write_text("{}")
    (project / "configs" / "split.yaml").write_text("base: [a]\nnovel: []\n")
    (project / "configs" / "teacher.yaml").write_text("name: t\n")
    path = project / "configs" / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"train_annotations": "data/train.json", "train_images": "data/images", "split": "split.yaml"},
        "model": {"clip_pretrained": "openai", "detector_weights": "coco"},
        "pretrain": {"teacher": "teacher.yaml"},
        "stages": [{"name": "a"}, {"name": "b", "pretrain": {"teacher": "rn50"}, "data": {"train_captions": "data/c.json"}}],
        "out_dir": "runs/x"}))
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(path, ["data.val_annotations=mine/val.json", "data.val_images=mine/val"])
    assert cfg.data.train_annotations == str(project / "data" / "train.json")  # the project root's
    assert cfg.data.split == str(project / "configs" / "split.yaml")  # beside the config
    assert cfg.data.train_images == str(project / "data" / "images")  # missing: one absolute path in the error
    assert cfg.pretrain.teacher == str(project / "configs" / "teacher.yaml")
    assert (cfg.model.clip_pretrained, cfg.model.detector_weights) == ("openai", "coco")  # tags, not paths
    assert (cfg.data.val_annotations, cfg.out_dir) == ("mine/val.json", "runs/x")  # --set and outputs: as typed
    second = stage_config(cfg, 1)
    assert second.pretrain.teacher == "rn50" and second.data.train_captions == str(project / "data" / "c.json")
    (project / "pyproject.toml").unlink()  # no project root: the config's folder
    assert load_train_config(path).data.train_annotations == str(project / "configs" / "data" / "train.json")


# --- staged configs from the command line ----------------------------------------------------


@pytest.fixture
def staged_yaml(tiny_shapes, tmp_path) -> Path:
    """A two-stage tiny config (stage b sets its own optim.max_steps, as the shipped ones do)."""
    data = to_dict(tiny_config(tiny_shapes, tmp_path / "unused", train={"ckpt_every": 1, "log_every": 1}))
    data["stages"] = [{"name": "a"}, {"name": "b", "optim": {"max_steps": 50}}]
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line(code: int, err: str) -> str:
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_set_reaches_a_stage_and_stages_runs_a_subset(staged_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", str(staged_yaml), "--out", str(out), "--stages", "a", "--set", "optim.max_steps=1"],
                       capsys)
    assert code == 0, err
    assert load_checkpoint(out / "a" / "last.pt")["step"] == 1 and not (out / "b").exists()
    [line] = unreached_overrides(load_train_config(staged_yaml, ["optim.max_steps=1"]).stages, ["optim.max_steps=1"])
    assert "does not reach stage b" in line and "stages.b.optim.max_steps=1" in line  # what to type instead
    code, _, err = run(["train", str(staged_yaml), "--out", str(out), "--stages", "b", "--set", "optim.max_steps=1",
                        "--set", "stages.b.optim.max_steps=2"], capsys)
    assert code == 0, err
    assert load_checkpoint(out / "b" / "last.pt")["step"] == 2 and "does not reach" not in err
    b_cfg = yaml.safe_load((out / "b" / "config.yaml").read_text())
    assert b_cfg["model"]["checkpoint"] == str(out / "a" / "model.pt")  # b started from a's model
    assert yaml.safe_load((out / "preset.yaml").read_text())["checkpoint"].endswith("b/model.pt")

    assert "a, b" in _one_line(*run(["train", str(staged_yaml), "--stages", "c"], capsys)[:3:2])
    assert "a, b" in _one_line(*run(["train", str(staged_yaml), "--set", "stages.c.optim.lr=1"], capsys)[:3:2])
    err = _one_line(*run(["train", str(staged_yaml), "--stages", "b", "--out", str(tmp_path / "new")], capsys)[:3:2])
    assert "a/model.pt" in err and "--stages a,b" in err


def test_resume_takes_the_run_folder_and_refuses_what_is_not_there(staged_yaml, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["--set", "stages.*.optim.max_steps=1"]
    assert run(["train", str(staged_yaml), "--out", str(out), *sets], capsys)[0] == 0
    stamp = (out / "a" / "model.pt").stat().st_mtime_ns
    # What the README showed: a file a staged run never writes. It used to train afresh, exit 0.
    err = _one_line(*run(["train", str(staged_yaml), "--resume", str(out / "last.pt"), *sets], capsys)[:3:2])
    assert "no such file" in err
    for resume in (out, out / "b" / "last.pt"):  # the run folder (--out defaults to it), or a stage's checkpoint
        code, _, err = run(["train", str(staged_yaml), "--resume", str(resume), *sets], capsys)
        assert code == 0, err
    assert (out / "a" / "model.pt").stat().st_mtime_ns == stamp  # finished stages are not redone
    err = _one_line(*run(["train", str(staged_yaml), "--resume", str(out), "--out", str(tmp_path / "x"), *sets],
                         capsys)[:3:2])
    assert "--out" in err

    single = tiny_config(tiny_shapes, out / "a")  # one stage: a run folder means its last.pt
    assert resolve_resume(single, out / "a") == out / "a" / "last.pt"
    with pytest.raises(BadConfig, match="no last.pt"):
        resolve_resume(single, tmp_path)
    with pytest.raises(BadConfig, match="no such file"):
        resolve_resume(single, tmp_path / "missing.pt")


def test_a_stage_after_a_gap_starts_from_its_own_predecessor(tiny_shapes, tmp_path):
    """--stages a,c skips b: c still starts from b's model and learns from b's preset, as in a full run."""
    from regionclip.train.config import select_stages

    cfg = tiny_config(tiny_shapes, tmp_path)
    cfg.stages = [{"name": "a"}, {"name": "b"}, {"name": "c", "loss": {"caption_regions": True}}]
    with pytest.raises(BadConfig, match="output of stage b"):
        select_stages(cfg, ["c", "a"])
    (tmp_path / "b").mkdir()
    for name in ("model.pt", "preset.yaml"):
        (tmp_path / "b" / name).write_text("")
    picked = select_stages(cfg, ["c", "a"])
    assert [s["name"] for s in picked.stages] == ["a", "c"]
    c = stage_config(picked, 1, previous=tmp_path / "a")  # what the stage loop passes: the stage run before it
    assert c.model.checkpoint == str(tmp_path / "b" / "model.pt")
    assert c.pretrain.teacher == str(tmp_path / "b" / "preset.yaml") and c.out_dir == str(tmp_path / "c")
    assert c.loss.caption_regions and c.optim == cfg.optim
