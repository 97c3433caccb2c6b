import time

import pytest
import torch

from regionclip import weights as W
from regionclip.errors import UnknownModel, WeightsUnavailable


def test_unknown_names():
    with pytest.raises(UnknownModel, match="unknown CLIP architecture"):
        W.resolve_clip("ViT-Nope", "openai")
    with pytest.raises(UnknownModel, match="unknown detector"):
        W.resolve_detector("yolo", "coco")
    with pytest.raises(WeightsUnavailable, match="no pretrained tag 'nosuchtag'"):
        W.resolve_clip("ViT-B-16", "nosuchtag")
    with pytest.raises(WeightsUnavailable, match="no weights 'imagenet'"):
        W.resolve_detector("fasterrcnn_resnet50_fpn", "imagenet")


def test_local_paths_and_random(tmp_path):
    assert W.resolve_clip("ViT-B-32", "none").path is None
    ckpt = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, ckpt)
    assert W.resolve_detector("fasterrcnn_resnet50_fpn", str(ckpt)).path == ckpt
    assert W.resolve_clip("ViT-B-32", str(tmp_path)).path == ckpt  # a folder holding one checkpoint
    with pytest.raises(WeightsUnavailable, match="checkpoint not found"):
        W.resolve_clip("ViT-B-32", str(tmp_path / "missing.pt"))


def test_cached_detector_file_is_used_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    url = W.DETECTORS["fasterrcnn_mobilenet_v3_large_320_fpn"].COCO_V1.url
    target = tmp_path / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir()
    target.write_bytes(b"x")
    monkeypatch.setattr(W, "host_reachable", lambda *a, **k: pytest.fail("probed the network"))
    assert W.resolve_detector("fasterrcnn_mobilenet_v3_large_320_fpn", "coco").path == target


def test_offline_resolution_is_fast_and_names_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="--clip-pretrained PATH.*--model demo"):
        W.resolve_clip("RN50", "openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10


def test_probe_gives_up_within_its_timeout():
    start = time.monotonic()
    assert W.host_reachable("name.invalid", timeout=1.0) is False  # .invalid never resolves
    assert time.monotonic() - start < 5


def test_weights_only_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(WeightsUnavailable, match="not a loadable checkpoint"):
        W.load_state(bad)
