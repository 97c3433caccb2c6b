"""Training loop: it learns, resumes bit-exactly, survives a broken checkpoint write, runs DDP,
and rejects bad configs with one line. CPU, tiny models, one generated 64 px shapes set
(conftest's ``tiny_shapes``), tens of steps at most."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

from regionclip import RegionCLIP
from regionclip.config import from_dict, to_dict
from regionclip.data import CocoDetection, load_split
from regionclip.data.shapes import BASE
from regionclip.train import TrainConfig, train
from regionclip.atomic import atomic_torch_save as atomic_save
from regionclip.errors import BadOutput
from regionclip.train.state import load_checkpoint
from regionclip.weights import register_clip_config
from conftest import run_ranks

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# Registered here too, not only by a training run's clip_configs: tests that build the model
# before training must not depend on which test ran first (xdist splits them across workers).
register_clip_config("train-vit-tiny", TINY_CLIP)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while the loop runs (the DDP workers set their own).

    Its tensors are small; on a shared 2-core machine two OpenMP threads mostly wait for each
    other behind the other processes. Measured at load average 8-10 without conftest's
    OMP_WAIT_POLICY: 12 steps of ``tiny_config``-like training took 62 s with two threads, 9 s with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(shapes, out, **sections) -> TrainConfig:
    """Six steps of the whole loop (proposals trained, proposals sampled as positives and
    background, flips) on 64 px images, a fraction of a second a step; ``sections`` update the
    nested dicts."""
    data = {
        "clip_configs": {"train-vit-tiny": TINY_CLIP},
        "model": {"clip_model": "train-vit-tiny", "clip_pretrained": "none", "device": "cpu",
                  "detector": "fasterrcnn_mobilenet_v3_large_320_fpn", "detector_weights": "none",
                  "proposals": {"num_proposals": 30, "min_size": 64, "max_size": 64, "anchor_scale": 0.5,
                                "box_head_width": 32},
                  "text": {"templates": ["a {}.", "a photo of a {}."]},
                  "scoring": {"logit_scale": None, "background": True}},
        "data": {"train_annotations": str(shapes["train_annotations"]), "train_images": str(shapes["train_images"]),
                 "split": str(shapes["split"]), "max_side": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": 6, "batch_size": 4},
        "loss": {"background_samples": 4, "box_head_samples": 16},
        "train": {"freeze": ["proposals.detector.backbone.body"], "ckpt_every": 3, "log_every": 3,
                  "num_workers": 0},
        "out_dir": str(out),
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(TrainConfig, data)


def state_of(model: RegionCLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_boxes(shapes) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    """The training images holding base objects, their base GT boxes (xyxy) and labels (indices into BASE)."""
    coco = json.loads(Path(shapes["train_annotations"]).read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files, boxes, labels = [], [], []
    for img in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"] and names[a["category_id"]] in BASE]
        if anns:
            files.append(str(Path(shapes["train_images"]) / img["file_name"]))
            boxes.append(torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]))
            labels += [BASE.index(names[a["category_id"]]) for a in anns]
    return files, boxes, torch.tensor(labels)


def gt_box_accuracy(model: RegionCLIP, shapes) -> float:
    """Top-1 accuracy of ``model`` classifying the training set's base GT boxes over the base names."""
    files, boxes, labels = base_boxes(shapes)
    model.eval()
    probs = model.classify(files, BASE, boxes)
    return float((torch.cat([p.argmax(dim=1) for p in probs]) == labels).float().mean())

    # A hard negative's box (label -1: none of the names) and the proposals on it are background.
    targets = [{"boxes": gt, "labels": torch.tensor([3, -1])}]
    boxes, labels, _ = sample_regions(proposals, targets, LossConfig(positive_samples=10, background_samples=10), background=12)
    by_box = {tuple(b.tolist()): int(l) for b, l in zip(boxes[0], labels)}
    assert by_box[(100.0, 100.0, 140.0, 140.0)] == 12 and by_box[(100.0, 100.0, 140.0, 150.0)] == 12
    assert by_box[(12.0, 12.0, 50.0, 50.0)] == 3 and labels.min() >= 0


def test_loop_learns(tiny_shapes, tmp_path):
    """30 steps on 16 images: the loss falls and the training set's base boxes are classified far
    above chance (1/9; the most frequent base category is 1/6 of the boxes). Measured over seeds
    0-9: loss ratio last/first 0.28-0.44, accuracy 0.45-0.71 (untrained 0.05-0.21); with lr 1e-7,
    or the optimizer step removed, ratio 0.94 and accuracy = untrained, and both checks fail."""
    shapes = tiny_shapes
    val = {"val_annotations": str(shapes["val_annotations"]), "val_images": str(shapes["val_images"])}
    # The proposal losses train with everything else; no proposals sampled as regions, so the
    # region-text loss sees GT boxes only and 30 steps are enough to learn colours and shapes.
    cfg = tiny_config(shapes, tmp_path / "run", data=val, optim={"max_steps": 30},
                      loss={"background_samples": 0, "positive_samples": 0},
                      train={"log_every": 10, "ckpt_every": 10, "eval_every": 20})
    register_clip_config("train-vit-tiny", TINY_CLIP)
    torch.manual_seed(cfg.train.seed)
    untrained = gt_box_accuracy(RegionCLIP(config=cfg.model), shapes)
    result = train(cfg)
    assert result.step == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:6]) / 6, sum(result.losses[-6:]) / 6
    assert last < 0.6 * first, f"loss did not fall: first 6 steps {first:.3f}, last 6 {last:.3f}"
    trained = gt_box_accuracy(result.model, shapes)
    assert trained >= 0.35 and trained >= untrained + 0.2, f"GT-box accuracy untrained {untrained:.3f}, trained {trained:.3f}"
    # Validation ran at step 20 and at the end, with AP50 on base, novel and overall.
    assert [e["step"] for e in result.evals] == [20, 30], result.evals
    assert {"base", "novel", "overall"} <= set(result.evals[-1]), result.evals
    out = tmp_path / "run"
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "model.pt", "preset.yaml"):
        assert (out / name).is_file(), name
    assert load_checkpoint(out / "last.pt")["step"] == 30
    # The preset written beside the model loads as a detector with the trained weights.
    model = RegionCLIP.from_pretrained(str(out / "preset.yaml"), device="cpu")
    assert model.cfg.clip_model == "train-vit-tiny"
    torch.testing.assert_close(model.clip.state_dict(), result.model.clip.state_dict(), rtol=0, atol=0)


def test_resume_reproduces_uninterrupted_run(tiny_shapes, tmp_path):
    """6 steps straight vs. interrupted after step 4 (checkpoint at 3, mid-epoch: 4 batches an
    epoch) and resumed: steps 4-6 cross into the next epoch, with flips and proposal sampling
    drawing from the restored RNG. Losses and every weight equal bit for bit, though the
    interrupted run decodes in a worker process and the others in the training process."""
    full = train(tiny_config(tiny_shapes, tmp_path / "full"))

    def interrupt(event):
        if event.get("step") == 4:
            raise KeyboardInterrupt

    cfg = tiny_config(tiny_shapes, tmp_path / "cut", train={"num_workers": 1})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=interrupt)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3
    resumed = train(tiny_config(tiny_shapes, tmp_path / "cut"), resume=tmp_path / "cut" / "last.pt")
    assert resumed.step == full.step == 6
    torch.testing.assert_close(resumed.losses, full.losses[3:], rtol=0, atol=0)
    a, b = state_of(full.model), state_of(resumed.model)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{key} differs after resume")


def test_sampled_regions_follow_the_iou_rules():
    """GT boxes keep their labels; proposals at IoU >= 0.5 take their box's label, below 0.5 background."""
    from regionclip.train.config import LossConfig
    from regionclip.train.sampling import sample_regions

    gt = torch.tensor([[10.0, 10, 50, 50], [100, 100, 140, 140]])
    props = torch.tensor([[12.0, 12, 50, 50],  # IoU 0.90 with box 0
                          [100, 100, 140, 150],  # IoU 0.80 with box 1
                          [10, 10, 30, 50],  # IoU 0.50 with box 0: positive
                          [30, 30, 70, 70],  # IoU 0.14: background
                          [200, 200, 240, 240]])  # background
    proposals = [(props, torch.ones(len(props)))]  # (boxes, objectness) of one image
    targets = [{"boxes": gt, "labels": torch.tensor([3, 7])}]
    boxes, labels, matched = sample_regions(proposals, targets, LossConfig(positive_samples=10, background_samples=10), background=12)
    # Regression targets: a positive's matched GT box, a background region's own box.
    target_of = {tuple(b.tolist()): tuple(m.tolist()) for b, m in zip(boxes[0], matched[0])}
    assert target_of[(12.0, 12.0, 50.0, 50.0)] == (10.0, 10.0, 50.0, 50.0)
    assert target_of[(100.0, 100.0, 140.0, 150.0)] == (100.0, 100.0, 140.0, 140.0)
    assert target_of[(30.0, 30.0, 70.0, 70.0)] == (30.0, 30.0, 70.0, 70.0)
    by_box = {tuple(b.tolist()): int(l) for b, l in zip(boxes[0], labels)}
    assert len(boxes[0]) == len(labels) == 7
    assert by_box[(12.0, 12.0, 50.0, 50.0)] == 3 and by_box[(10.0, 10.0, 30.0, 50.0)] == 3
    assert by_box[(100.0, 100.0, 140.0, 150.0)] == 7
    assert by_box[(30.0, 30.0, 70.0, 70.0)] == 12 and by_box[(200.0, 200.0, 240.0, 240.0)] == 12
    _, labels, _ = sample_regions(proposals, targets, LossConfig(positive_samples=1, background_samples=0), background=12)
    assert labels.tolist()[:2] == [3, 7] and len(labels) == 3
    # With a minimum overlap, a proposal far from every labelled box (maybe an unlabelled object)
    # is not background; the partial crop at IoU 0.14 still is.
    window = LossConfig(positive_samples=0, background_samples=10, background_iou_min=0.1)
    boxes, labels, _ = sample_regions(proposals, targets, window, background=12)
    assert [tuple(b) for b in boxes[0][2:].tolist()] == [(30.0, 30.0, 70.0, 70.0)] and labels.tolist() == [3, 7, 12]
    window.background_far_samples = 5
    boxes, labels, _ = sample_regions(proposals, targets, window, background=12)
    assert [tuple(b) for b in boxes[0][2:].tolist()] == [(30.0, 30.0, 70.0, 70.0), (200.0, 200.0, 240.0, 240.0)]
    # A far proposal the RPN is sure of (objectness 1 here) is left out; the near one stays.
    window.background_far_max_objectness = 0.5
    boxes, labels, _ = sample_regions(proposals, targets, window, background=12)
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
    with pytest.raises(BadOutput, match="No space left"):  # one line naming the file, not a traceback
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


def _run_two_ranks(worker, port: int, cfg: TrainConfig, tmp_path) -> None:
    """Run ``worker(rank, 2, port, cfg, tmp_path)`` in two processes and wait for both."""
    run_ranks(worker, (2, port, cfg, str(tmp_path)))


def test_ddp_two_processes_match_single(tiny_shapes, tmp_path):
    """Two gloo processes of 2 images each give the single process's losses over 4 images."""
    # Same global batch of 4 either way; what differs per process (flips, sampled proposals,
    # BatchNorm batch statistics) is switched off so the two runs compute the same numbers.
    sections = dict(data={"hflip_prob": 0.0}, loss={"background_samples": 0, "positive_samples": 0},
                    train={"train_proposals": False}, optim={"max_steps": 3, "batch_size": 4})
    single = train(tiny_config(tiny_shapes, tmp_path / "single", **sections))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(tiny_shapes, tmp_path / "ddp", **sections)
    _run_two_ranks(_ddp_worker, port, cfg, tmp_path)
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
def test_bad_config_gives_one_error_line(tiny_shapes, tmp_path, capsys, problem, expected):
    from regionclip_cli.main import main

    shapes = tiny_shapes
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


def _ddp_resume_and_eval_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    """Sharded validation of one model, then a run whose step-2 checkpoint is resumed."""
    import shutil

    from regionclip.train.loop import evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model = RegionCLIP(config=cfg.model)
    val = CocoDetection(cfg.data.val_annotations, cfg.data.val_images)
    ap = evaluate(model, val, load_split(cfg.data.split), rank, world, batch_size=1)
    torch.save(ap, f"{out}/ap{rank}.pt")

    def snapshot(event):  # rank 0 only: at step 3, last.pt holds step 2
        if event.get("step") == 3 and "eval" not in event:
            shutil.copy(f"{cfg.out_dir}/last.pt", f"{out}/step2.pt")

    full = train(cfg, progress=snapshot)
    torch.distributed.barrier()
    resumed_cfg = from_dict(TrainConfig, {**to_dict(cfg), "out_dir": f"{out}/resumed"})
    resumed = train(resumed_cfg, resume=f"{out}/step2.pt")
    torch.save({"full": full.losses, "resumed": resumed.losses,
                "same_weights": all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                                     resumed.model.state_dict().values()))},
               f"{out}/run{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_sharded_validation_and_per_rank_resume(tiny_shapes, tmp_path):
    """2 gloo processes: validation split across them gives the single process's figures exactly;
    resuming a 2-rank run continues each rank's own random stream (flips and sampled regions
    differ per rank), bit-exact against the uninterrupted 2-rank run."""
    from regionclip.train.loop import evaluate

    cfg = tiny_config(tiny_shapes, tmp_path / "ddp", optim={"max_steps": 4, "batch_size": 4},
                      train={"ckpt_every": 2, "log_every": 2},
                      data={"val_annotations": str(tiny_shapes["val_annotations"]),
                            "val_images": str(tiny_shapes["val_images"])})
    torch.manual_seed(0)
    model = RegionCLIP(config=cfg.model)
    single = evaluate(model, CocoDetection(cfg.data.val_annotations, cfg.data.val_images),
                      load_split(cfg.data.split), batch_size=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run_two_ranks(_ddp_resume_and_eval_worker, port, cfg, tmp_path)
    for rank in range(2):
        assert torch.load(tmp_path / f"ap{rank}.pt") == single
        run = torch.load(tmp_path / f"run{rank}.pt")
        assert len(run["full"]) == 4 and run["resumed"] == run["full"][2:]
        assert run["same_weights"]


def test_frozen_parts_and_batchnorm_stay_bit_identical(tiny_shapes, tmp_path):
    """Frozen prefixes and (by default) every BatchNorm keep parameters AND running statistics,
    through the training steps and the no-grad proposal pass alike; the rest trains."""
    cfg = tiny_config(tiny_shapes, tmp_path / "frozen", optim={"max_steps": 3, "warmup_steps": 1})
    register_clip_config("train-vit-tiny", TINY_CLIP)
    torch.manual_seed(cfg.train.seed)
    before = state_of(RegionCLIP(config=cfg.model))
    after = state_of(train(cfg).model)
    bn = [n.rsplit(".", 1)[0] for n in before if n.endswith("running_mean")]
    assert bn, "the detector has BatchNorm layers"
    frozen = [k for k in before if k.startswith("proposals.detector.backbone.body")
              or any(k.startswith(m + ".") for m in bn)]
    assert any(k.endswith("running_var") for k in frozen)
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"{key} changed"
    assert not torch.equal(before["clip.text_projection"], after["clip.text_projection"])
    # With freeze_bn off, BatchNorm outside the frozen prefixes learns its statistics.
    cfg = tiny_config(tiny_shapes, tmp_path / "bn", optim={"max_steps": 3, "warmup_steps": 1},
                      train={"freeze": [], "freeze_bn": False})
    after = state_of(train(cfg).model)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("running_mean"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA device (runtime.autocast_for)")
def test_fp16_trains_with_a_grad_scaler(tiny_shapes, tmp_path):
    cfg = tiny_config(tiny_shapes, tmp_path / "fp16", optim={"max_steps": 3, "warmup_steps": 1},
                      train={"precision": "fp16"})
    cfg.model.device = "cuda"
    result = train(cfg)
    scaler = load_checkpoint(tmp_path / "fp16" / "last.pt")["scaler"]
    assert scaler["scale"] > 0 and all(torch.isfinite(torch.tensor(result.losses)))


def test_checkpoints_carry_the_loss_scaler_state(tiny_shapes, tmp_path):
    """fp32/bf16 runs save the (disabled) scaler too, so every checkpoint resumes the same way."""
    train(tiny_config(tiny_shapes, tmp_path / "s", optim={"max_steps": 1, "warmup_steps": 1}))
    assert "scaler" in load_checkpoint(tmp_path / "s" / "last.pt")


def test_training_samples_by_objectness_probabilities_under_the_regionclip_recipe(tiny_shapes, tmp_path, monkeypatch):
    """A model whose scoring fuses raw RPN logits (scoring.recipe regionclip) still hands the
    region sampler probabilities in [0, 1] when its proposals do not train (the propose() path):
    its thresholds and rankings read objectness as one, and a raw logit is negative below 0.5."""
    import regionclip.train.finetune as finetune
    from regionclip.batch import ImageBatch
    from regionclip.train.optim import build_model

    seen = []
    real = finetune.sample_regions
    monkeypatch.setattr(finetune, "sample_regions", lambda proposals, *a, **k: seen.append(
        torch.cat([o for _, o in proposals])) or real(proposals, *a, **k))
    cfg = tiny_config(tiny_shapes, tmp_path, train={"train_proposals": False},
                      model={"scoring": {"recipe": "regionclip", "background": True, "objectness_weight": 0.5,
                                         "logit_scale": None}})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.train)
    with torch.no_grad():
        model.proposals.detector.rpn.head.cls_logits.bias.fill_(-2.0)  # an RPN that doubts: logits < 0, sigmoid 0.12
    step = finetune.RegionTextLoss(model, cfg, 1, ["red circle", "green square"])
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0]]), "labels": torch.tensor([0])}]
    step(ImageBatch.from_tensors([torch.rand(3, 64, 64)]), targets)
    objectness = torch.cat(seen)
    assert len(objectness) and bool(((objectness >= 0) & (objectness <= 1)).all()), objectness.min()


def test_eval_images_scores_the_same_first_images_every_time(tiny_shapes, tmp_path, monkeypatch):
    """train.eval_images: each validation scores the N val images with the lowest ids, with their
    ground truth only (a subset, not the full set with detections missing)."""
    import regionclip.train.loop as loop

    seen = []
    real = loop.evaluate_model
    monkeypatch.setattr(loop, "evaluate_model", lambda model, coco, *a, **k: seen.append(
        (sorted(coco.imgs), {x["image_id"] for x in coco.dataset["annotations"]})) or real(model, coco, *a, **k))
    cfg = tiny_config(tiny_shapes, tmp_path, optim={"max_steps": 2, "batch_size": 4},
                      train={"eval_every": 1, "eval_images": 2, "ckpt_every": 2, "log_every": 1},
                      data={"val_annotations": str(tiny_shapes["val_annotations"]),
                            "val_images": str(tiny_shapes["val_images"])})
    train(cfg)
    all_ids = sorted(x["id"] for x in json.loads(Path(tiny_shapes["val_annotations"]).read_text())["images"])
    assert len(all_ids) > 2 and len(seen) == 2  # step 1 and the end
    for ids, annotated in seen:
        assert ids == all_ids[:2] and annotated <= set(ids)
