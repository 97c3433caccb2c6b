"""Training loop: it learns, resumes bit-exactly, survives a broken checkpoint write, runs DDP,
and rejects bad configs with one line. CPU, tiny models, generated shapes data."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from regionclip import RegionCLIP
from regionclip.config import from_dict
from regionclip.data import CocoDetection, load_split, make_shapes
from regionclip.train import TrainConfig, evaluate, train
from regionclip.train.state import atomic_save, load_checkpoint
from regionclip.weights import register_clip_config

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=12, seed=0, image_size=(64, 96))


def tiny_config(shapes, out, **sections) -> TrainConfig:
    """A seconds-per-dozen-steps config; ``sections`` update the nested dicts."""
    data = {
        "clip_configs": {"train-vit-tiny": TINY_CLIP},
        "model": {"clip_model": "train-vit-tiny", "clip_pretrained": "none", "device": "cpu",
                  "detector": "fasterrcnn_mobilenet_v3_large_320_fpn", "detector_weights": "none",
                  "proposals": {"num_proposals": 30, "min_size": 96, "max_size": 96, "anchor_scale": 0.5},
                  "text": {"templates": ["a {}.", "a photo of a {}."]},
                  "scoring": {"logit_scale": None, "background": True}},
        "data": {"train_annotations": str(shapes["train_annotations"]), "train_images": str(shapes["train_images"]),
                 "split": str(shapes["split"]), "max_side": 96},
        "optim": {"lr": 2e-3, "warmup_steps": 5, "max_steps": 12, "batch_size": 4},
        "loss": {"background_samples": 4, "box_head_samples": 16},
        "train": {"freeze": ["proposals.detector.backbone.body"], "ckpt_every": 4, "log_every": 4},
        "out_dir": str(out),
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(TrainConfig, data)


def state_of(model: RegionCLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_loop_learns(shapes, tmp_path):
    val = {"val_annotations": str(shapes["val_annotations"]), "val_images": str(shapes["val_images"]),
           "split": str(shapes["split"])}
    cfg = tiny_config(shapes, tmp_path / "run", data=val, optim={"max_steps": 160, "warmup_steps": 10, "lr": 3e-3},
                      train={"log_every": 20, "ckpt_every": 80})
    register_clip_config("train-vit-tiny", TINY_CLIP)
    torch.manual_seed(cfg.train.seed)
    untrained = evaluate(RegionCLIP(config=cfg.model),
                         CocoDetection(cfg.data.val_annotations, cfg.data.val_images), load_split(cfg.data.split))
    result = train(cfg)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    trained = result.evals[-1]
    assert last < 0.7 * first, f"loss did not fall: first 20 steps {first:.3f}, last 20 {last:.3f}"
    assert trained["overall"] > untrained["overall"] + 5, f"AP50 untrained {untrained}, trained {trained}"
    out = tmp_path / "run"
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "model.pt", "preset.yaml"):
        assert (out / name).is_file(), name
    # The preset written beside the model loads as a detector.
    model = RegionCLIP.from_pretrained(str(out / "preset.yaml"), device="cpu")
    assert model.cfg.clip_model == "train-vit-tiny"


def test_resume_reproduces_uninterrupted_run(shapes, tmp_path):
    full = train(tiny_config(shapes, tmp_path / "full"))

    def interrupt(event):
        if event.get("step") == 10:
            raise KeyboardInterrupt

    cfg = tiny_config(shapes, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=interrupt)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 8
    resumed = train(tiny_config(shapes, tmp_path / "cut"), resume=tmp_path / "cut" / "last.pt")
    assert resumed.step == full.step == 12
    torch.testing.assert_close(resumed.losses, full.losses[8:], rtol=0, atol=0)
    a, b = state_of(full.model), state_of(resumed.model)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{key} differs after resume")


def test_sampled_regions_follow_the_iou_rules():
    """GT boxes keep their labels; proposals at IoU >= 0.5 take their box's label, below 0.5 background."""
    from regionclip.train.config import LossConfig
    from regionclip.train.loop import sample_regions

    gt = torch.tensor([[10.0, 10, 50, 50], [100, 100, 140, 140]])
    props = torch.tensor([[12.0, 12, 50, 50],  # IoU 0.90 with box 0
                          [100, 100, 140, 150],  # IoU 0.80 with box 1
                          [10, 10, 30, 50],  # IoU 0.50 with box 0: positive
                          [30, 30, 70, 70],  # IoU 0.14: background
                          [200, 200, 240, 240]])  # background

    class Proposals:
        def __call__(self, images):
            return [(props, torch.ones(len(props)))]

    class Model:
        proposals = Proposals()

    targets = [{"boxes": gt, "labels": torch.tensor([3, 7])}]
    boxes, labels = sample_regions(Model(), [None], targets, LossConfig(positive_samples=10, background_samples=10), background=12)
    by_box = {tuple(b.tolist()): int(l) for b, l in zip(boxes[0], labels)}
    assert len(boxes[0]) == len(labels) == 7
    assert by_box[(12.0, 12.0, 50.0, 50.0)] == 3 and by_box[(10.0, 10.0, 30.0, 50.0)] == 3
    assert by_box[(100.0, 100.0, 140.0, 150.0)] == 7
    assert by_box[(30.0, 30.0, 70.0, 70.0)] == 12 and by_box[(200.0, 200.0, 240.0, 240.0)] == 12
    _, labels = sample_regions(Model(), [None], targets, LossConfig(positive_samples=1, background_samples=0), background=12)
    assert labels.tolist()[:2] == [3, 7] and len(labels) == 3
    # With a minimum overlap, a proposal far from every labelled box (maybe an unlabelled object)
    # is not background; the partial crop at IoU 0.14 still is.
    window = LossConfig(positive_samples=0, background_samples=10, background_iou_min=0.1)
    boxes, labels = sample_regions(Model(), [None], targets, window, background=12)
    assert [tuple(b) for b in boxes[0][2:].tolist()] == [(30.0, 30.0, 70.0, 70.0)] and labels.tolist() == [3, 7, 12]
    window.background_far_samples = 5
    boxes, labels = sample_regions(Model(), [None], targets, window, background=12)
    assert [tuple(b) for b in boxes[0][2:].tolist()] == [(30.0, 30.0, 70.0, 70.0), (200.0, 200.0, 240.0, 240.0)]
    # A far proposal the RPN is sure of (objectness 1 here) is left out; the near one stays.
    window.background_far_max_objectness = 0.5
    boxes, labels = sample_regions(Model(), [None], targets, window, background=12)
    assert [tuple(b) for b in boxes[0][2:].tolist()] == [(30.0, 30.0, 70.0, 70.0)] and labels.tolist() == [3, 7, 12]


def test_interrupted_checkpoint_write_keeps_last_good(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "step": 4}, path)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"model": {"w": torch.zeros(3)}, "optimizer": {}, "scheduler": {}, "step": 8}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 4 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"], "partial temp file left behind"


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(cfg)
    torch.save(result.losses, f"{out}/losses{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_single(shapes, tmp_path):
    # Same global batch of 4 either way; what differs per process (flips, sampled proposals,
    # BatchNorm batch statistics) is switched off so the two runs compute the same numbers.
    sections = dict(data={"hflip_prob": 0.0}, loss={"background_samples": 0, "positive_samples": 0},
                    train={"train_proposals": False}, optim={"max_steps": 4, "batch_size": 4})
    single = train(tiny_config(shapes, tmp_path / "single", **sections))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(shapes, tmp_path / "ddp", **sections)
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        losses = torch.load(tmp_path / f"losses{rank}.pt")
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.losses), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ddp" / "model.pt").is_file()


@pytest.mark.parametrize("problem, expected", [
    ("unknown_key", "unknown key 'lrr' (did you mean 'lr'?)"),
    ("missing_annotations", "annotation file not found"),
    ("unknown_category", "category 'purple hexagon' is not in"),
    ("background_window", "0 <= background_iou_min < background_iou"),
    ("far_objectness", "background_far_max_objectness must be in (0, 1]"),
])
def test_bad_config_gives_one_error_line(shapes, tmp_path, capsys, problem, expected):
    from regionclip_cli.main import main

    data = yaml.safe_load(yaml.safe_dump({"data": {
        "train_annotations": str(shapes["train_annotations"]), "train_images": str(shapes["train_images"]),
        "split": str(shapes["split"])}}))
    if problem == "unknown_key":
        data["optim"] = {"lrr": 0.1}
    elif problem == "background_window":
        data["loss"] = {"background_iou_min": 0.6}
    elif problem == "far_objectness":
        data["loss"] = {"background_far_max_objectness": 0.0}
    elif problem == "missing_annotations":
        data["data"]["train_annotations"] = str(tmp_path / "nope.json")
    else:
        split = tmp_path / "split.yaml"
        split.write_text(yaml.safe_dump({"base": ["red circle", "purple hexagon"], "novel": []}))
        data["data"]["split"] = str(split)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "--out", str(tmp_path / "out")])
    assert exit_info.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines
