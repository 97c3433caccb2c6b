"""The caption stages (clip, region_pretrain), staged configs and box refinement training.

Losses against hand-computed values, the DDP feature gather against one process, pseudo labels
against their rules, and each stage learning and resuming on conftest's tiny shapes set."""

from __future__ import annotations

import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from regionclip.errors import BadAnnotations, BadConfig, BadInput
from regionclip.train import train
from regionclip.train.config import load_train_config, stage_config
from regionclip.train.losses import box_regression_loss, clip_loss, pseudo_labels
from regionclip.train.state import load_checkpoint
from test_train import _run_two_ranks, one_thread, tiny_config  # noqa: F401  (fixture re-used)


def test_clip_loss_equals_hand_computed_3x3():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]])
    scale = 2.0
    sims = [[1, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]]  # image i . text j
    lse = lambda row: math.log(sum(math.exp(scale * v) for v in row))  # noqa: E731
    i2t = sum(lse(sims[i]) - scale * sims[i][i] for i in range(3)) / 3
    t2i = sum(lse([sims[k][j] for k in range(3)]) - scale * sims[j][j] for j in range(3)) / 3
    assert float(clip_loss(image, text, scale)) == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def _gather_worker(rank: int, world: int, port: int, _cfg, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    x = torch.randn(4, 4)[2 * rank:2 * rank + 2]  # this rank's half of the global batch
    feats = F.normalize(ddp(x), dim=-1)
    loss = clip_loss(feats, feats.roll(1, dims=1), 5.0, world)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": net.weight.grad}, f"{out}/gather{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_feature_gather_equals_one_process_on_the_global_batch(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    feats = F.normalize(net(torch.randn(4, 4)), dim=-1)
    loss = clip_loss(feats, feats.roll(1, dims=1), 5.0)
    loss.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run_two_ranks(_gather_worker, port, None, tmp_path)
    for rank in range(2):
        got = torch.load(tmp_path / f"gather{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach())
        torch.testing.assert_close(got["grad"], net.weight.grad)  # DDP's average = the global gradient


def test_pseudo_labels_take_the_teachers_best_mentioned_concept():
    probs = torch.tensor([
        [0.70, 0.20, 0.10],  # image 0 (candidates 0 and 2): concept 0, share 0.875
        [0.10, 0.80, 0.10],  # concept 1 looks best but is no candidate: 0 vs 2 is a tie, share 0.5
        [0.60, 0.30, 0.10],  # concept 0, share 0.857, less like it than row 0
        [0.40, 0.35, 0.25],  # concept 0, share 0.615
        [0.05, 0.15, 0.80],  # image 1 (candidate 2 only): always its best candidate
    ])
    concepts = [torch.tensor([0, 2]), torch.tensor([2])]
    assert pseudo_labels(probs, [4, 1], concepts, threshold=0.7, top_k=5).tolist() == [0, -1, 0, -1, 2]
    # top-k per concept ranks by how much the crop looks like the concept (pool-wide probability)
    assert pseudo_labels(probs, [4, 1], concepts, threshold=0.5, top_k=2).tolist() == [0, -1, 0, -1, 2]
    assert pseudo_labels(probs, [4, 1], concepts, threshold=0.5, top_k=1).tolist() == [0, -1, -1, -1, 2]
    eligible = torch.tensor([False, True, True, True, False])
    assert pseudo_labels(probs, [4, 1], concepts, 0.5, 1, eligible).tolist() == [-1, -1, 0, -1, -1]
    none = [torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)]
    assert pseudo_labels(probs, [4, 1], none, 0.5, 2).tolist() == [-1] * 5


def test_box_evidence_labels_boxed_proposals_and_narrows_the_rest():
    """use_boxes: a proposal on a labelled box takes its concept; a far, confident one may only take
    a mentioned concept that no box labels (here the novel one); one in between takes none."""
    from types import SimpleNamespace

    from regionclip.concepts import ConceptPool
    from regionclip.train.config import LossConfig, PretrainConfig
    from regionclip.train.stages import RegionConceptLoss

    pool = ConceptPool(["red circle", "blue square", "red triangle"])
    cfg = SimpleNamespace(loss=LossConfig(background_iou_min=0.1), pretrain=PretrainConfig(use_boxes=True, min_objectness=0.5))
    loss = RegionConceptLoss.__new__(RegionConceptLoss)
    torch.nn.Module.__init__(loss)
    loss.cfg = cfg
    loss.label_concepts = torch.tensor([0, 1])  # the training vocabulary: red circle, blue square
    boxes = [torch.tensor([[10.0, 10, 50, 50], [12, 10, 50, 50], [100, 100, 140, 140], [200, 200, 240, 240], [30, 30, 70, 70]])]
    objectness = [torch.tensor([0.9, 0.9, 0.9, 0.2, 0.9])]
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([1]),
                "concepts": torch.tensor([1, 2])}]  # captions: a blue square and a red triangle
    fixed, eligible, candidates = loss.box_evidence(boxes, objectness, targets)
    assert fixed.tolist() == [1, 1, -1, -1, -1]
    assert eligible.tolist() == [False, False, True, False, False]  # [3]: unsure RPN; [4]: IoU 0.14
    assert candidates[0].tolist() == [2]

    # The teacher sees far proposals too, however many boxes crowd the labelled object: 8 slots,
    # 10 proposals on the box, 3 far ones of which two are duplicates (NMS keeps the surer one).
    cfg.pretrain.proposals_per_image = 8
    near = torch.tensor([[10.0, 10, 50, 50]]).repeat(10, 1) + torch.arange(10.0)[:, None] * 0.5
    far = torch.tensor([[100.0, 100, 140, 140], [101, 100, 141, 140], [200, 10, 230, 40]])
    picked = loss.select(torch.cat([near, far]), torch.cat([torch.full((10,), 0.9), torch.tensor([0.6, 0.5, 0.4])]),
                         targets[0]["boxes"])
    assert sorted(picked.tolist()) == [0, 1, 2, 3, 4, 5, 10, 12]


def test_box_regression_loss_is_zero_on_target_and_smooth_l1_off_it():
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert float(box_regression_loss(t, t)) == 0
    # |d| = 1 > beta = 1/9: |d| - beta / 2
    assert float(box_regression_loss(torch.tensor([[1.0, 0, 0, 0]]), t)) == pytest.approx(1 - 1 / 18)


def _stage(shapes, out, stage: str, **sections):
    base = dict(optim={"max_steps": 4, "batch_size": 4, "warmup_steps": 1},
                train={"ckpt_every": 4, "log_every": 1, "num_workers": 0},
                clip={"image_size": 48})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_config(shapes, out, stage=stage, **base)


@pytest.fixture(scope="module")
def clip_model(tiny_shapes, tmp_path_factory):
    """A 2-step clip stage: a teacher and a starting point for region_pretrain."""
    return train(_stage(tiny_shapes, tmp_path_factory.mktemp("clip"), "clip", optim={"max_steps": 2})).out_dir


def _stage_run(stage, shapes, out, clip_dir, **sections):
    if stage == "clip":
        return _stage(shapes, out, "clip", optim={"max_steps": 8, "lr": 5e-3}, **sections)
    return _stage(shapes, out, "region_pretrain", optim={"max_steps": 8, "lr": 5e-3},
                  pretrain={"teacher": str(clip_dir / "preset.yaml"), "proposals_per_image": 8, "use_boxes": True},
                  model={"checkpoint": str(clip_dir / "model.pt")}, **sections)


@pytest.mark.parametrize("stage", ["clip", "region_pretrain"])
def test_caption_stages_lower_their_loss_and_resume_exactly(stage, tiny_shapes, clip_model, tmp_path):
    (tmp_path / "b").mkdir()

    def keep_step_4(event):  # at step 5 last.pt holds step 4: a run killed there would resume from it
        if event.get("step") == 5 and not (tmp_path / "b" / "last.pt").exists():
            shutil.copy(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    full = train(_stage_run(stage, tiny_shapes, tmp_path / "a", clip_model), progress=keep_step_4)
    assert sum(full.losses[-3:]) < sum(full.losses[:3]), full.losses
    assert load_checkpoint(tmp_path / "a" / "last.pt")["step"] == 8
    if stage == "region_pretrain":
        lines = [yaml.safe_load(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("loss_region_concept", 0) > 0 for r in lines), "no proposal got a pseudo label"
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 4
    resumed = train(_stage_run(stage, tiny_shapes, tmp_path / "b", clip_model), resume=tmp_path / "b" / "last.pt")
    # The same losses as the uninterrupted run (caption draws and flips included).
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]))


def test_staged_config_runs_each_stage_from_the_previous(tiny_shapes, tmp_path):
    cfg = tiny_config(tiny_shapes, tmp_path / "staged", clip={"image_size": 48}, optim={"max_steps": 2, "batch_size": 4},
                      train={"ckpt_every": 2, "log_every": 1})
    cfg.stages = [{"name": "c", "stage": "clip"},
                  {"name": "r", "stage": "region_pretrain", "pretrain": {"proposals_per_image": 4}},
                  {"name": "f", "stage": "finetune", "start": "scratch", "loss": {"box_regression_weight": 1.0, "box_head_hidden": 8,
                                                              "caption_regions": True}}]
    events = []
    result = train(cfg, progress=events.append)
    out = tmp_path / "staged"
    for name in ("c", "r", "f"):
        assert (out / name / "model.pt").is_file() and (out / name / "metrics.jsonl").is_file()
    assert {e.get("stage") for e in events} == {"c", "r", "f"}
    r_cfg = yaml.safe_load((out / "r" / "config.yaml").read_text())
    assert r_cfg["model"]["checkpoint"].endswith("c/model.pt") and r_cfg["pretrain"]["teacher"].endswith("c/preset.yaml")
    f_cfg = yaml.safe_load((out / "f" / "config.yaml").read_text())
    assert f_cfg["model"]["checkpoint"] is None and f_cfg["pretrain"]["teacher"].endswith("r/preset.yaml")  # start: scratch
    preset = yaml.safe_load((out / "preset.yaml").read_text())
    assert preset["regions"]["box_refinement"] is True and preset["checkpoint"].endswith("f/model.pt")
    assert result.step == 2
    # Resuming a finished staged run redoes nothing.
    mtime = (out / "c" / "model.pt").stat().st_mtime_ns
    train(cfg, resume=out)
    assert (out / "c" / "model.pt").stat().st_mtime_ns == mtime


def test_stage_inputs_are_checked_with_one_line(tiny_shapes, tmp_path):
    with pytest.raises(BadAnnotations, match="captions"):
        train(_stage(tiny_shapes, tmp_path / "x", "clip", data={"train_captions": str(tmp_path / "none.json")}))
    with pytest.raises(BadConfig):
        train(_stage(tiny_shapes, tmp_path / "y", "clip", data={"concepts": []}))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stage": "region_pretrain", "data": {"train_annotations": "a", "train_images": "b"}}))
    with pytest.raises(BadConfig, match="pretrain.teacher"):
        load_train_config(path)
    path.write_text(yaml.safe_dump({"stages": [{"stage": "clip"}], "data": {"train_annotations": "a", "train_images": "b"}}))
    with pytest.raises(BadConfig, match="needs a name"):
        load_train_config(path)


@pytest.mark.parametrize("builder, max_layers", [("resnet", 5), ("mobilenet", 6)])
def test_trainable_backbone_layers_freeze_what_torchvision_freezes(builder, max_layers):
    """Our prefixes on a built detector freeze exactly the parameters torchvision's own extractor does."""
    import torchvision
    from torchvision.models.detection import backbone_utils as bu

    from regionclip.proposals import frozen_backbone_prefixes

    for n in (0, 2, max_layers):  # none, some, all
        if builder == "resnet":
            net = torchvision.models.resnet18()
            reference = bu._resnet_fpn_extractor(torchvision.models.resnet18(), n)
        else:
            net = torchvision.models.mobilenet_v3_small()
            reference = bu._mobilenet_extractor(torchvision.models.mobilenet_v3_small(), True, n)
        detector = torchvision.models.detection.FasterRCNN(bu._resnet_fpn_extractor(net, 5) if builder == "resnet"
                                                           else bu._mobilenet_extractor(net, True, max_layers),
                                                           num_classes=2)
        prefixes = frozen_backbone_prefixes(detector, n)
        ours = {k for k, _ in detector.backbone.body.named_parameters() if any(f"backbone.body.{k}".startswith(p) for p in prefixes)}
        theirs = {k for k, p in reference.body.named_parameters() if not p.requires_grad}
        assert ours == theirs, (n, sorted(ours ^ theirs)[:4])
    with pytest.raises(BadInput, match=f"0..{max_layers}"):
        frozen_backbone_prefixes(detector, max_layers + 1)


def _loose(boxes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Boxes an RPN might give: each xyxy box grown by 15% of its size on every side, then each
    side moved by up to 5% more either way (IoU about 0.5-0.65 with the object)."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    grow = torch.tensor([-0.15, -0.15, 0.15, 0.15])
    return boxes + (grow + (torch.rand(boxes.shape, generator=g) * 2 - 1) * 0.05) * size


def _loose_box_iou(shapes, g: torch.Generator, move) -> tuple[float, float]:
    """Mean IoU with their objects of fresh loose boxes (``_loose``, new draws from ``g``) around
    every training object, before and after ``move(image, loose_boxes)``."""
    from regionclip.data import CocoDetection
    from torchvision.ops import box_iou

    data = CocoDetection(shapes["train_annotations"], shapes["train_images"], max_side=64)
    g.manual_seed(123)  # new draws, never trained on
    raw_iou, moved_iou = [], []
    with torch.no_grad():
        for i in range(len(data)):
            image, target = data[i]
            image = image.float() / 255  # the dataset's uint8 as the model's [0, 1]
            if len(target["boxes"]):
                loose = _loose(target["boxes"], g)
                raw_iou.append(box_iou(loose, target["boxes"]).diagonal())
                moved_iou.append(box_iou(move(image, loose), target["boxes"]).diagonal())
    return float(torch.cat(raw_iou).mean()), float(torch.cat(moved_iou).mean())


def test_box_refinement_moves_loose_boxes_onto_their_objects(tiny_shapes, tmp_path, monkeypatch):
    """Trained on loose boxes around the objects as the sampled proposals, the box head brings
    fresh loose boxes (new draws) closer to their objects than they were."""
    import regionclip.train.finetune as loop
    from regionclip.batch import ImageBatch

    g = torch.Generator().manual_seed(0)
    real = loop.sample_regions

    def loose_proposals(proposals, targets, lc, background, ignore=None):
        loose = [(_loose(t["boxes"], g), torch.ones(len(t["boxes"]))) for t in targets]
        return real(loose, targets, lc, background, ignore)

    monkeypatch.setattr(loop, "sample_regions", loose_proposals)
    cfg = tiny_config(tiny_shapes, tmp_path, optim={"max_steps": 40, "lr": 3e-3, "warmup_steps": 5, "batch_size": 4,
                                                    "box_head_lr": 3e-2},
                      loss={"box_regression_weight": 2.0, "box_head_hidden": 32, "positive_samples": 8,
                            "background_samples": 0},
                      train={"train_proposals": False, "ckpt_every": 40, "log_every": 10},
                      data={"hflip_prob": 0.0})
    model = train(cfg).model.eval()
    def move(image, loose):
        batch = ImageBatch.from_tensors([image])
        return model.refine(batch, [loose], model.embed(batch, [loose], raw=True))[0]

    raw, refined = _loose_box_iou(tiny_shapes, g, move)
    assert refined > raw + 0.1, (raw, refined)


def test_refined_proposals_move_loose_boxes_onto_their_objects(tiny_shapes, tmp_path, monkeypatch):
    """proposals.source=refined: a narrow second stage (box_head_width), trained from a checkpoint
    that has none, moves fresh loose boxes closer to their objects; the preset written at the end
    loads it and proposes with it."""
    from regionclip import RegionCLIP
    from regionclip.batch import ImageBatch
    from regionclip.proposals import ProposalStage
    from torchvision.models.detection.transform import resize_boxes

    g = torch.Generator().manual_seed(0)
    real_rpn, real_train = ProposalStage._rpn, ProposalStage.forward_train

    def loose_train(self, images, targets, *args, **kwargs):  # remembers what the RPN's boxes should surround
        self.loose_for = (targets, [tuple(img.shape[-2:]) for img in images])
        try:
            return real_train(self, images, targets, *args, **kwargs)
        finally:
            del self.loose_for

    def loose_rpn(self, images, features):  # training proposals: loose boxes around the objects
        boxes, scores, head = real_rpn(self, images, features)
        if hasattr(self, "loose_for"):
            targets, sizes = self.loose_for
            boxes = [_loose(resize_boxes(t["boxes"], size, resized), g).repeat(4, 1)
                     for t, size, resized in zip(targets, sizes, images.image_sizes)]
            scores = [torch.ones(len(b)) for b in boxes]
        return boxes, scores, head

    monkeypatch.setattr(ProposalStage, "forward_train", loose_train)
    monkeypatch.setattr(ProposalStage, "_rpn", loose_rpn)
    start = tiny_config(tiny_shapes, tmp_path / "rpn_only", optim={"max_steps": 1}, train={"ckpt_every": 1})
    train(start)  # an RPN-only checkpoint: no second stage stored
    proposals = {"num_proposals": 30, "min_size": 64, "max_size": 64, "anchor_scale": 0.5,
                 "source": "refined", "box_head_width": 32}
    cfg = tiny_config(tiny_shapes, tmp_path / "refined",
                      model={"checkpoint": str(tmp_path / "rpn_only" / "model.pt"), "proposals": proposals},
                      optim={"max_steps": 40, "lr": 1e-2, "warmup_steps": 5, "batch_size": 4},
                      loss={"box_head_samples": 64, "positive_samples": 0, "background_samples": 0},
                      train={"ckpt_every": 40, "log_every": 10, "train_image_tower": False, "train_text_tower": False,
                             "freeze": ["proposals.detector.backbone", "proposals.detector.rpn"]},
                      data={"hflip_prob": 0.0})
    train(cfg)
    lines = [yaml.safe_load(x) for x in (tmp_path / "refined" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_det_box_reg" in r for r in lines)
    model = RegionCLIP.from_pretrained(str(tmp_path / "refined" / "preset.yaml"), device="cpu")
    assert model.cfg.proposals.source == "refined"
    assert model.proposals.detector.roi_heads.box_head.fc7.out_features == 32
    stage = model.proposals

    def move(image, loose):
        batch, _ = stage.detector.transform([image])  # 64 px in, 64 px out: no rescaling
        return stage._refined_boxes(batch, stage.detector.backbone(batch.tensors), [loose])[0]

    raw, refined = _loose_box_iou(tiny_shapes, g, move)
    assert refined > raw + 0.1, (raw, refined)
    with torch.no_grad():
        assert len(model.propose(ImageBatch.from_tensors([torch.rand(3, 64, 64)]))[0][0])


def test_stage_overrides_merge_at_every_depth(tiny_shapes, tmp_path):
    cfg = tiny_config(tiny_shapes, tmp_path)
    cfg.stages = [{"name": "a"}, {"name": "b", "model": {"proposals": {"source": "refined"}}, "optim": {"lr": 1e-4}}]
    second = stage_config(cfg, 1, previous=tmp_path / "a")
    assert second.model.proposals.source == "refined"
    assert second.model.proposals.num_proposals == cfg.model.proposals.num_proposals == 30  # kept, not reset
    assert second.optim.lr == 1e-4 and second.optim.max_steps == cfg.optim.max_steps
    assert second.model.checkpoint == str(tmp_path / "a" / "model.pt")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_load_with_every_stage(path):
    cfg = load_train_config(path)
    for i in range(len(cfg.stages)):
        assert stage_config(cfg, i).stage in ("clip", "region_pretrain", "finetune")


def test_checkpoints_sharing_a_clip_name_load_in_one_process(tmp_path):
    """Two checkpoints whose tiny CLIPs share a name but not a shape (the demo model before and
    after a retrain) each build with their own architecture."""
    from regionclip import RegionCLIP
    from regionclip.weights import register_clip_config
    from test_train import TINY_CLIP

    paths = []
    for context in (16, 24):
        arch = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "context_length": context}}
        register_clip_config("shared-name-tiny", arch)
        model = RegionCLIP(clip_model="shared-name-tiny", clip_pretrained="none", detector_weights="none",
                           detector="fasterrcnn_mobilenet_v3_large_320_fpn", device="cpu")
        paths.append(tmp_path / f"c{context}.pt")
        model.save(paths[-1])
    for path, context in zip(paths, (16, 24)):
        model = RegionCLIP(clip_model="shared-name-tiny", checkpoint=str(path), detector="fasterrcnn_mobilenet_v3_large_320_fpn",
                           device="cpu")
        assert model.clip.context_length == context


@pytest.mark.parametrize("shaped", [True, False])
def test_caption_regions_reach_the_rpn_as_positives_and_ignore_regions(shaped, tiny_shapes, clip_model, tmp_path,
                                                                        monkeypatch):
    """loss.proposal_caption_positives / proposal_ignore_captions: the very boxes the teacher
    picks for caption concepts (those the region loss trains on) go to the proposal stage as
    positives and ignore regions; switched off, the proposal stage gets none."""
    import regionclip.train.finetune as loop
    from regionclip.proposals import ProposalStage
    from regionclip.train.stages import RegionConceptLoss

    handed, picked = [], []
    real_train, real_pick = ProposalStage.forward_train, RegionConceptLoss.caption_regions

    def spy_train(self, images, targets, objectness="classify", regions=None):
        def recorded(proposals):
            out = regions(proposals)
            handed.append(out)
            return out
        return real_train(self, images, targets, objectness, recorded if regions else None)

    def spy_pick(self, *args):
        out = real_pick(self, *args)
        picked.append(out[0])
        return out

    monkeypatch.setattr(ProposalStage, "forward_train", spy_train)
    monkeypatch.setattr(RegionConceptLoss, "caption_regions", spy_pick)
    ignore_seen = []
    real_sample = loop.sample_regions
    monkeypatch.setattr(loop, "sample_regions", lambda *a, ignore=None, **k: ignore_seen.append(ignore) or real_sample(
        *a, ignore=ignore, **k))
    cfg = _stage(tiny_shapes, tmp_path / "run", "finetune", optim={"max_steps": 3},
                 loss={"caption_regions": True, "proposal_ignore_captions": shaped, "proposal_caption_positives": shaped},
                 pretrain={"teacher": str(clip_model / "preset.yaml"), "proposals_per_image": 8, "use_boxes": True,
                           "threshold": 0.0})
    train(cfg)
    assert len(picked) == 3  # one pick per step, made once and shared
    if not shaped:
        assert handed == [] and ignore_seen == [None] * 3
        return
    assert len(handed) == 3 and sum(len(b) for boxes in picked for b in boxes) > 0
    for (ignore, positives), boxes, sampled in zip(handed, picked, ignore_seen):
        assert ignore is positives is boxes is sampled


def test_hard_negatives_train_as_background_beside_caption_regions(clip_model, tmp_path, monkeypatch):
    """data.negative_categories (make-shapes --others' "other"): their boxes reach the region loss
    as background, never as a name, and the caption teacher leaves them alone."""
    import regionclip.train.finetune as loop
    from regionclip.data import make_shapes

    shapes = make_shapes(tmp_path / "data", n_train=8, n_val=0, seed=3, image_size=(96, 96), others=3)
    seen = []
    real_sample = loop.sample_regions

    def spy(proposals, targets, lc, background, ignore=None):
        out = real_sample(proposals, targets, lc, background, ignore=ignore)
        seen.append((targets, (list(out[0]), out[1]), background))  # the caller extends its lists in place
        return out

    monkeypatch.setattr(loop, "sample_regions", spy)
    cfg = _stage({**shapes, "split": shapes["split"]}, tmp_path / "run", "finetune", optim={"max_steps": 2},
                 data={"negative_categories": ["other"]}, loss={"caption_regions": True, "box_regression_weight": 1.0,
                                                                "box_head_hidden": 8},
                 pretrain={"teacher": str(clip_model / "preset.yaml"), "proposals_per_image": 8, "use_boxes": True})
    result = train(cfg)
    assert all(math.isfinite(x) for x in result.losses)
    negatives = 0
    for targets, (boxes, labels), background in seen:
        for t, b, lab in zip(targets, boxes, labels.split([len(b) for b in boxes])):
            neg = t["labels"] < 0
            negatives += int(neg.sum())
            # GT boxes come first among an image's regions, in the targets' order.
            assert (lab[:len(t["labels"])][neg] == background).all() and (lab >= 0).all()
    assert negatives > 0


def test_a_later_stage_without_its_data_stops_the_run_before_the_first_stage(tiny_shapes, tmp_path):
    cfg = tiny_config(tiny_shapes, tmp_path / "staged", optim={"max_steps": 1, "batch_size": 4})
    cfg.stages = [{"name": "a"}, {"name": "b", "data": {"train_annotations": str(tmp_path / "missing.json")}}]
    with pytest.raises(BadConfig, match=r"stage b: data.train_annotations .*missing.json does not exist"):
        train(cfg)
    assert not (tmp_path / "staged").exists()
