"""What keeps the training step fed (train/feed.py, train/sampling.py, the loop's log steps): uint8
batches converted on the device, workers that persist, per-sample augmentation seeds, and a step
that waits for the device a fixed number of times. CPU, tiny models, conftest's ``tiny_shapes``."""

from __future__ import annotations

import pytest
import torch

from regionclip.data import CocoDetection
from regionclip.train import train
from test_train import one_thread, tiny_config  # noqa: F401  (fixture re-used)


def test_feed_flips_depend_on_sample_epoch_and_rank_not_on_workers(tiny_shapes, tmp_path):
    """A sample's flip is drawn from a seed of (seed, epoch, rank, index): two ranks given the same
    images do not flip them alike (seeded by the epoch alone, they did), and the same rank and
    epoch draws the same flips with 0 or 2 workers, so a resume is exact whatever num_workers."""
    from regionclip.train.feed import Feed

    data = CocoDetection(tiny_shapes["train_annotations"], tiny_shapes["train_images"], train=True, hflip_prob=0.5)

    class Same:  # both ranks get the same 16 images, so only the flips can differ
        def set_epoch(self, epoch):
            pass

        def __len__(self):
            return len(data)

        def __iter__(self):
            return iter(range(len(data)))

    def flips(rank: int, epoch: int = 0, workers: int = 0) -> list[list[float]]:
        feed = Feed(data, Same(), 4, seed=0, rank=rank, num_workers=workers, device=torch.device("cpu"), epoch=epoch)
        out = []
        for _ in range(feed.per_epoch):
            images, _, _ = feed.next()
            assert images[0].dtype == torch.float32 and float(images[0].max()) <= 1.0  # made from uint8
            # A flip shows in the first column of pixels (the old last one).
            out += [img[:, :, 0].flatten()[:8].tolist() for img in images]
        return out

    first = flips(0)
    assert first == flips(0, workers=2) and first != flips(1) and first != flips(0, epoch=1)


def test_feed_keeps_its_workers_across_epochs_and_resumes_mid_epoch(tiny_shapes):
    """One DataLoader for the run (workers persist across epochs); ``position`` skips the batches
    an interrupted epoch already trained on."""
    from torch.utils.data import DistributedSampler

    from regionclip.train.feed import Feed

    data = CocoDetection(tiny_shapes["train_annotations"], tiny_shapes["train_images"], train=True)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    feed = Feed(data, sampler, 4, seed=0, rank=0, num_workers=1, device=torch.device("cpu"))
    assert feed.loader.persistent_workers
    ids = [[t["image_id"] for t in feed.next()[1]] for _ in range(feed.per_epoch + 1)]
    assert (feed.epoch, feed.position) == (1, 1)
    workers = feed.loader._iterator._workers
    feed.next()
    assert feed.loader._iterator._workers is workers  # the same processes in the second epoch
    later = Feed(data, sampler, 4, seed=0, rank=0, num_workers=0, device=torch.device("cpu"), position=1)
    assert [t["image_id"] for t in later.next()[1]] == ids[1]


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for the device on CUDA: reading a value
    (``item``/``float``/``tolist``: ``_local_scalar_dense``), ``nonzero`` and boolean indexing."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else []) if i is not None)
        if name in ("_local_scalar_dense", "nonzero", "masked_select") or bool_index:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_region_sampling_waits_for_the_device_a_fixed_number_of_times():
    """The sampler picks every image's quotas in one pass: the host waits as often for 8 images
    as for 1 (it waited about four times per image)."""
    from regionclip.train.config import LossConfig
    from regionclip.train.sampling import sample_regions

    lc = LossConfig(positive_samples=4, background_samples=4, background_far_samples=2)

    def syncs(n_images: int) -> int:
        g = torch.Generator().manual_seed(n_images)
        proposals, targets = [], []
        for _ in range(n_images):
            xy = torch.rand(40, 2, generator=g) * 100
            proposals.append((torch.cat([xy, xy + 10 + torch.rand(40, 2, generator=g) * 40], 1),
                              torch.rand(40, generator=g)))
            targets.append({"boxes": proposals[-1][0][:3] + 1, "labels": torch.tensor([0, 1, 2])})
        with HostSyncs() as mode:
            boxes, labels, matched = sample_regions(proposals, targets, lc, background=5)
        assert len(boxes) == n_images and len(labels) == sum(len(b) for b in boxes)
        return mode.count

    assert syncs(8) == syncs(1) <= 3


def test_sampling_quotas_and_uniformity():
    """Each kind's quota per image is met when there are enough candidates, and the pick is uniform:
    over many draws every far-background candidate is picked about equally often."""
    from regionclip.train.config import LossConfig
    from regionclip.train.sampling import sample_regions

    gt = torch.tensor([[0.0, 0, 40, 40]])
    far = torch.tensor([[100.0 + 10 * k, 100, 130 + 10 * k, 130] for k in range(6)])
    near = torch.tensor([[20.0, 20, 60, 60]] * 5)  # IoU 0.14 with the GT box
    proposals = [(torch.cat([far, near]), torch.full((11,), 0.01))] * 2
    targets = [{"boxes": gt, "labels": torch.tensor([0])}] * 2
    lc = LossConfig(positive_samples=0, background_samples=2, background_far_samples=3, background_iou_min=0.1)
    hits = torch.zeros(6)
    torch.manual_seed(0)
    for _ in range(300):
        boxes, labels, _ = sample_regions(proposals, targets, lc, background=9)
        assert [len(b) for b in boxes] == [1 + 2 + 3] * 2
        picked = boxes[0][3:]
        hits += (picked[:, None, :] == far[None]).all(-1).any(0).float()
    assert torch.all((hits / 300 - 0.5).abs() < 0.1), hits / 300  # 3 of 6: each about half the time


def test_losses_leave_the_device_only_at_log_steps(tiny_shapes, tmp_path, monkeypatch):
    """The step's loss is read on the host once per ``log_every`` steps, not every step, and every
    step's loss still reaches ``TrainResult.losses``."""
    import regionclip.train.loop as loop

    calls = []
    real = loop._all_mean
    monkeypatch.setattr(loop, "_all_mean", lambda x, world: calls.append(len(x)) or real(x, world))
    result = train(tiny_config(tiny_shapes, tmp_path, optim={"max_steps": 4}, train={"log_every": 2}))
    assert calls == [2, 2] and len(result.losses) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned uint8 batches are for a CUDA device")
def test_feed_sends_pinned_uint8_and_converts_on_the_device(tiny_shapes):
    from torch.utils.data import DistributedSampler

    from regionclip.train.feed import Feed

    data = CocoDetection(tiny_shapes["train_annotations"], tiny_shapes["train_images"], train=True)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=False, drop_last=True)
    feed = Feed(data, sampler, 4, seed=0, rank=0, num_workers=1, device=torch.device("cuda"))
    raw, _ = next(iter(feed.loader))
    assert raw[0].dtype == torch.uint8 and raw[0].is_pinned()
    images, targets, _ = feed.next()
    assert images[0].is_cuda and images[0].dtype == torch.float32 and targets[0]["boxes"].is_cuda
