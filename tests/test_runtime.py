"""``runtime.resolve_device`` under a launcher: one GPU per process, from ``LOCAL_RANK`` (CUDA faked)."""

from __future__ import annotations

import pytest
import torch

from regionclip.errors import BadInput
from regionclip.runtime import describe_device, resolve_device


@pytest.fixture
def two_gpus(monkeypatch) -> list:
    """A machine with two CUDA devices as torch reports it; the devices made current, recorded."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(torch.device(d)))
    return made_current


def test_each_of_two_ranks_takes_its_own_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for local in (0, 1):  # what torchrun --nproc_per_node 2 gives its two processes
        monkeypatch.setenv("RANK", str(local))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        assert resolve_device("cuda") == torch.device("cuda", local)
        assert resolve_device("auto") == torch.device("cuda", local)
        assert describe_device(resolve_device("cuda")) == f"cuda:{local} (LOCAL_RANK={local})"
        assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is the user's choice
        assert resolve_device("cpu") == torch.device("cpu")
    assert two_gpus == [torch.device("cuda", i) for i in (0, 0, 0, 0, 1, 1, 1, 0)]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(BadInput, match=r"LOCAL_RANK=2 but 2 CUDA device\(s\) visible: start at most 2"):
        resolve_device("cuda")
    monkeypatch.delenv("LOCAL_RANK")  # one process alone: the current device, by its index
    assert resolve_device("cuda") == torch.device("cuda", 0) and describe_device(torch.device("cuda", 0)) == "cuda:0"
