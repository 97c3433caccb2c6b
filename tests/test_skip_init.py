"""Models loaded from weights skip the random init those weights replace; nothing else does."""

import threading

import pytest
import torch
from conftest import TINY_DETECTOR
from torch.nn import init

from regionclip.errors import WeightsUnavailable
from regionclip.proposals import HEAD_PREFIXES, build_detector
from regionclip.skip_init import skip_init
from regionclip.weights import Resolved


def test_fills_are_no_ops_inside_on_this_thread_only():
    original = init.normal_
    inside, outside = torch.zeros(1000), torch.zeros(1000)
    entered, built = threading.Event(), threading.Event()

    def other_thread():  # builds while the main thread is inside skip_init
        entered.wait(10)
        init.normal_(outside)
        built.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with skip_init():
        with skip_init():  # nested: still inside after the inner block ends
            pass
        entered.set()
        assert built.wait(10)
        init.normal_(inside)
        torch.nn.Linear(4, 4)  # the constructors' fills go through the same functions
    thread.join()
    assert torch.count_nonzero(inside) == 0
    assert torch.count_nonzero(outside) > 900
    assert init.normal_ is original


def _state(head_width: int = 16) -> dict:
    torch.manual_seed(0)
    return build_detector(Resolved(TINY_DETECTOR, "none", None), head_width=head_width).state_dict()


def test_detector_loaded_whole_equals_its_state():
    state = _state()
    model = build_detector(Resolved(TINY_DETECTOR, "checkpoint", None), state)
    assert model.has_box_head
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_rpn_only_state_keeps_a_random_second_stage_as_before():
    """Without the second stage in the state everything is drawn as before: the head equals a
    fresh build's from the same seed (not uninitialised memory)."""
    rpn_only = {k: v for k, v in _state().items() if not k.startswith(HEAD_PREFIXES)}
    torch.manual_seed(1)
    model = build_detector(Resolved(TINY_DETECTOR, "checkpoint", None), rpn_only, head_width=16)
    torch.manual_seed(1)
    fresh = build_detector(Resolved(TINY_DETECTOR, "none", None), head_width=16)
    assert not model.has_box_head
    head = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}
    assert head and all(torch.equal(v, fresh.state_dict()[k]) for k, v in head.items())


def test_a_second_stage_stored_in_part_is_refused():
    state = {k: v for k, v in _state().items() if not k.startswith("roi_heads.box_predictor.")}
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        build_detector(Resolved(TINY_DETECTOR, "checkpoint", None), state)
