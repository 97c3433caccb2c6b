"""Fine-tuning that keeps the rest (regionclip/train/retention.py): the retention report, WiSE-FT's
mix, distillation of the starting model's names, ``from_model``. Tiny models, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from regionclip import RegionCLIP
from regionclip.errors import BadConfig
from regionclip.train import load_train_config, train
from regionclip.train.retention import interpolate
from regionclip.train.state import load_checkpoint
from test_train import tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits (test_train.py's measurement)
    yield
    torch.set_num_threads(before)


def held_out(shapes, **extra) -> dict:
    """The tiny val set as both the held-out set and the new classes' val set."""
    return {"data": {"val_annotations": str(shapes["val_annotations"]), "val_images": str(shapes["val_images"])},
            "retention": {"annotations": str(shapes["val_annotations"]), "images": str(shapes["val_images"]),
                          "split": str(shapes["split"]), **extra}}


def test_interpolate_mixes_floating_weights_and_leaves_the_rest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].num_batches_tracked.fill_(7)
    end = {k: v.clone() for k, v in net.state_dict().items()}
    interpolate(net, start, 0.25)
    torch.testing.assert_close(net[0].weight, 0.75 * start["0.weight"] + 0.25 * end["0.weight"])
    assert int(net[1].num_batches_tracked) == 7  # a counter is not a weight
    interpolate(net, {"0.bias": torch.zeros(5)}, 0.0)  # another shape: left as it is
    torch.testing.assert_close(net[0].bias, start["0.bias"])
    shared = nn.ModuleDict({"a": net[0], "b": nn.Sequential(net[0])})  # one weight under two names
    before = net[0].weight.clone()
    interpolate(shared, {"a.weight": torch.zeros(2, 3), "b.0.weight": torch.zeros(2, 3)}, 0.5)
    torch.testing.assert_close(net[0].weight, 0.5 * before)  # mixed once, not twice


def test_report_before_and_after_and_the_written_model_is_the_mix(tiny_shapes, tmp_path):
    """retention.json holds both sets before, fine-tuned and after; model.pt is WiSE-FT's mix of
    the start weights and last.pt's; the preset's own labels gain the trained names."""
    sections = held_out(tiny_shapes, wise_alpha=0.5, eval_images=2)
    cfg = tiny_config(tiny_shapes, tmp_path / "run", optim={"max_steps": 2, "batch_size": 4},
                      train={"ckpt_every": 2, "log_every": 1}, **sections)
    cfg.model.labels = ["purple blob"]
    events = []
    result = train(cfg, progress=lambda e: events.append(e) if "retention" in e else None)

    report = json.loads((tmp_path / "run" / "retention.json").read_text())
    assert report == json.loads(json.dumps(result.retention))
    for column in ("before", "fine_tuned", "after"):
        assert set(report[column]) == {"held_out", "new"}
        assert {"overall", "base", "novel"} <= set(report[column]["held_out"]), report[column]
    assert report["wise_alpha"] == 0.5 and set(report["kept"]) == {"overall", "base", "novel"}
    assert [list(e["retention"]) for e in events][0] == ["before"] and "after" in events[1]["retention"]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["retention"] == report
    assert result.evals[-1] == {"step": 2, **report["after"]["new"]}

    torch.manual_seed(cfg.train.seed)  # the start weights, as the run built them
    start = RegionCLIP(config=cfg.model).state_dict()
    trained = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    written = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    name = "clip.visual.proj"
    assert not torch.equal(trained[name], start[name])
    torch.testing.assert_close(written["clip"]["visual.proj"].float(), torch.lerp(start[name], trained[name], 0.5))
    preset = yaml.safe_load((tmp_path / "run" / "preset.yaml").read_text())
    assert preset["labels"][0] == "purple blob" and len(preset["labels"]) > 1


def test_distillation_starts_at_zero_and_its_teacher_stays_the_start(tiny_shapes, tmp_path):
    """The teacher is a frozen copy: equal to the student at step 1 (KL 0), apart after an update."""
    sections = held_out(tiny_shapes, distill_weight=1.0, eval_images=1)
    cfg = tiny_config(tiny_shapes, tmp_path / "run", optim={"max_steps": 2, "batch_size": 4, "warmup_steps": 0},
                      train={"ckpt_every": 2, "log_every": 1, "train_text_tower": False}, **sections)
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    retain = [x["loss_retain"] for x in lines if "loss_retain" in x]
    assert len(retain) == 2 and retain[0] < 1e-5 < retain[1], retain


def test_from_model_starts_from_a_preset_under_the_files_own_model_keys(tiny_shapes, tmp_path):
    model = tiny_config(tiny_shapes, tmp_path).model
    preset = tmp_path / "start.yaml"
    preset.write_text(yaml.safe_dump({**json.loads(json.dumps(model.__dict__, default=lambda o: o.__dict__)),
                                      "labels": ["red circle"]}))
    run = {"from_model": str(preset), "model": {"proposals": {"num_proposals": 7}},
           "data": {"train_annotations": str(tiny_shapes["train_annotations"]),
                    "train_images": str(tiny_shapes["train_images"])}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    cfg = load_train_config(path)
    assert cfg.model.labels == ["red circle"] and cfg.model.proposals.num_proposals == 7
    assert cfg.model.proposals.min_size == 64 and cfg.model.clip_model == model.clip_model

    path.write_text(yaml.safe_dump({**run, "retention": {"wise_alpha": 0.5}}))
    with pytest.raises(BadConfig, match="held-out set"):
        load_train_config(path)
    path.write_text(yaml.safe_dump({**run, "from_model": "no-such-model"}))
    with pytest.raises(BadConfig, match="from_model no-such-model"):
        load_train_config(path)


def test_replay_labels_old_world_images_once_and_trains_them_beside_the_new(tiny_shapes, tmp_path):
    """retention.replay_images: replay_count images drawn from the folder, labelled by the start
    model before the first step into replay.json (absolute paths, the held-out set's names, scores
    at the threshold or more), then in the training set after the new images."""
    from regionclip.train.loop import Trainer
    from regionclip.train.replay import WithReplay

    sections = held_out(tiny_shapes, eval_images=1, replay_images=str(tiny_shapes["train_images"]),
                        replay_count=3, replay_threshold=0.0)
    cfg = tiny_config(tiny_shapes, tmp_path / "run", optim={"max_steps": 1, "batch_size": 4},
                      train={"ckpt_every": 1, "log_every": 1}, **sections)
    trainer = Trainer(cfg)
    replay = json.loads((tmp_path / "run" / "replay.json").read_text())
    held = json.loads(tiny_shapes["val_annotations"].read_text())
    assert [c["name"] for c in replay["categories"]] == [c["name"] for c in sorted(held["categories"], key=lambda c: c["id"])]
    assert 1 <= len(replay["images"]) <= 3 and replay["annotations"]
    assert all(Path(i["file_name"]).is_absolute() and Path(i["file_name"]).parent == tiny_shapes["train_images"].resolve()
               for i in replay["images"])
    assert all(a["score"] >= 0.0 for a in replay["annotations"])
    assert isinstance(trainer.train_set, WithReplay) and len(trainer.train_set) == 16 + len(replay["images"])
    assert trainer.run().retention["settings"]["replay_count"] == 3

    (tmp_path / "run" / "replay.json").write_text(json.dumps({**replay, "annotations": replay["annotations"][:1]}))
    resumed = Trainer(cfg, resume=tmp_path / "run" / "last.pt")  # reads the labels back, labels nothing
    assert sum(len(t["labels"]) for _, t in (resumed.train_set.replay[i] for i in range(len(resumed.train_set.replay)))) == 1

    cfg.retention.replay_threshold, cfg.out_dir = 1.0, str(tmp_path / "none")
    with pytest.raises(BadConfig, match="replay_threshold"):
        Trainer(cfg)


def test_with_replay_names_the_old_names_after_the_new_and_relabels_replayed_boxes(tiny_shapes):
    from regionclip.data import CocoDetection, load_split
    from regionclip.train.replay import WithReplay

    split = load_split(tiny_shapes["split"])
    new = CocoDetection(tiny_shapes["train_annotations"], tiny_shapes["train_images"], split["base"])
    old_order = split["novel"] + split["base"]
    replay = CocoDetection(tiny_shapes["val_annotations"], tiny_shapes["val_images"], old_order)
    both = WithReplay(new, replay)
    assert both.category_names == split["base"] + split["novel"] and len(both) == len(new) + len(replay)
    assert torch.equal(both[0][1]["labels"], new[0][1]["labels"])
    for j in range(len(replay)):
        _, mine = both[(len(new) + j, 7)]
        _, theirs = replay[(j, 7)]
        assert [both.category_names[k] for k in mine["labels"]] == [old_order[k] for k in theirs["labels"]]
        torch.testing.assert_close(mine["boxes"], theirs["boxes"])
