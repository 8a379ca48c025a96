"""minunet.functional.process: process-wide settings held by blocks in several threads,
NumPy's huge-page advice off within the U-Net's passes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from minunet.functional import process
from minunet.unet import UNet

numpy_advice = getattr(np._core.multiarray, "_get_madvise_hugepage", None)
set_numpy_advice = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
needs_advice = pytest.mark.skipif(numpy_advice is None, reason="this NumPy has no such switch")


def test_a_held_setting_is_restored_when_the_last_open_block_ends_in_any_thread():
    state = {"value": "user's"}
    writes = []

    def set_(value):
        writes.append(value)
        state["value"] = value

    setting = process.HeldSetting(lambda: state["value"], set_, "held")
    first_open, second_open, first_closed = (threading.Event() for _ in range(3))
    seen = []

    def first():
        with setting.held():
            first_open.set()
            second_open.wait(10)
        first_closed.set()

    def second():
        first_open.wait(10)
        with setting.held():
            second_open.set()
            first_closed.wait(10)
            seen.append(state["value"])  # the first block closed, this one still holds
        seen.append(state["value"])

    workers = [threading.Thread(target=first), threading.Thread(target=second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert seen == ["held", "user's"]
    assert writes == ["held", "user's"]  # set once by the first block, restored by the last


def test_a_held_setting_is_restored_after_an_error():
    state = {"value": 3}
    setting = process.HeldSetting(lambda: state["value"], lambda v: state.update(value=v), 1)
    with pytest.raises(KeyError), setting.held(), setting.held():
        assert state["value"] == 1
        raise KeyError("inside")
    assert state["value"] == 3


@needs_advice
@pytest.mark.parametrize("before", [True, False])
def test_numpy_asks_for_no_huge_pages_within_the_block_and_as_before_after_it(before):
    previous = set_numpy_advice(before)
    try:
        with process.without_huge_pages():
            assert numpy_advice() is False
        assert numpy_advice() is before
    finally:
        set_numpy_advice(previous)


@needs_advice
def test_the_unet_runs_forward_and_backward_without_huge_pages(monkeypatch):
    net = UNet(depth=2, base_channels=2, padding="same", seed=0)
    seen = []
    for layer, method in ((net.head, "forward"), (net.head, "backward"),
                          (net.encoder[0], "backward")):
        original = getattr(layer, method)

        def spy(*args, original=original, **kwargs):
            seen.append(numpy_advice())
            return original(*args, **kwargs)

        monkeypatch.setattr(layer, method, spy)
    previous = set_numpy_advice(True)
    try:
        logits = net.forward(np.zeros((1, 1, 8, 8), np.float32))
        net.backward(np.ones_like(logits))
        assert numpy_advice() is True
    finally:
        set_numpy_advice(previous)
    assert seen == [False, False, False]
