"""The training loop: learning, determinism, checkpoints and resume, NaN detection."""

from __future__ import annotations

import os

import numpy as np
import pytest

from minunet.data import carve_separation_borders, synthetic_cells
from minunet.train import History, evaluate, fit, load_checkpoint, training_targets
from minunet.unet import UNet


@pytest.fixture(scope="module")
def cells():
    images, labels = synthetic_cells(4, size=64, seed=3)
    return (images[:3], labels[:3]), (images[3:], labels[3:])


def small_net(**kwargs):
    config = dict(depth=2, base_channels=4, padding="same", batch_norm=True, seed=0)
    config.update(kwargs)
    return UNet(**config)


FAST = dict(batch_size=2, tile_size=32, progress=False)


def parameters(net):
    return {name: p.data.copy() for name, p in net.named_parameters()}


def test_training_learns_cells(cells):
    train, val = cells
    net = small_net(base_channels=8)
    history = fit(net, train, val, steps=40, steps_per_epoch=20, **FAST)
    assert isinstance(history, History) and len(history.loss) == 40
    assert [e["step"] for e in history.epochs] == [20, 40]
    assert np.mean(history.loss[-10:]) < 0.7 * np.mean(history.loss[:5])
    assert history.epochs[-1]["val_iou"] > 0.6
    assert set(evaluate(net, val)) == {"iou", "dice", "pixel_error", "f1", "count_error"}


def test_two_runs_with_the_same_seed_are_identical(cells):
    train, _ = cells
    runs = []
    for _ in range(2):
        net = small_net()
        history = fit(net, train, steps=3, seed=5, **FAST)
        runs.append((history.loss, parameters(net)))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        np.testing.assert_array_equal(value, runs[1][1][name])
    other = fit(small_net(), train, steps=3, seed=6, **FAST)
    assert other.loss != runs[0][0]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_continues_exactly(cells, tmp_path, optimizer):
    train, _ = cells
    settings = dict(steps_per_epoch=2, optimizer=optimizer, seed=1, **FAST)
    straight = small_net()
    expected = fit(straight, train, steps=4, **settings)

    path = tmp_path / "ckpt.npz"
    fit(small_net(), train, steps=2, checkpoint_path=path, **settings)
    resumed_net = small_net(seed=99)  # different start: everything must come from the file
    resumed = fit(resumed_net, train, steps=4, checkpoint_path=path, resume=True, **settings)
    assert resumed.loss == expected.loss
    for name, value in parameters(straight).items():
        np.testing.assert_array_equal(parameters(resumed_net)[name], value)
    meta, net_state, optimizer_state = load_checkpoint(path)
    assert meta["step"] == 4 and len(meta["history"]["loss"]) == 4
    assert optimizer_state["step_count"] == 4
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # atomic writes


def test_resume_rejects_a_different_network(cells, tmp_path):
    train, _ = cells
    path = tmp_path / "ckpt.npz"
    fit(small_net(), train, steps=1, checkpoint_path=path, **FAST)
    with pytest.raises(ValueError, match="config"):
        fit(small_net(base_channels=6), train, steps=2, checkpoint_path=path, resume=True,
            **FAST)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        fit(small_net(), train, steps=2, checkpoint_path=path, resume=True, **FAST)


def test_nan_loss_names_the_step(cells):
    (images, labels), _ = cells
    broken = images.copy()
    broken[:, 10:50, 10:50] = np.nan
    with pytest.raises(FloatingPointError, match="step 1"):
        fit(small_net(), (broken, labels), steps=3, augment=False, **FAST)


def test_training_targets_cut_lines_between_touching_cells():
    labels = np.zeros((10, 12), np.int32)
    labels[2:8, 1:6], labels[2:8, 6:11] = 1, 2
    target, weights = training_targets(labels)
    np.testing.assert_array_equal(target, carve_separation_borders(labels) > 0)
    assert target.dtype == np.int64 and weights.dtype == np.float32
    assert weights[4, 6] == weights.max()  # the cut line weighs most
    _, plain = training_targets(labels, weight_maps=False, class_weights=(1.0, 1.0))
    np.testing.assert_array_equal(plain, 1.0)


def test_fit_argument_errors(cells):
    train, _ = cells
    with pytest.raises(ValueError, match="3-class network trains on class-index masks"):
        fit(UNet(num_classes=3, depth=2, base_channels=2, padding="same"), train, steps=1)
    with pytest.raises(ValueError, match="optimizer"):
        fit(small_net(), train, steps=1, optimizer="rmsprop", **FAST)
    with pytest.raises(ValueError, match="checkpoint_path"):
        fit(small_net(), train, steps=1, resume=True, **FAST)
    with pytest.raises(TypeError, match="train_data"):
        fit(small_net(), "cells", steps=1, **FAST)


def test_time_budget_stops_early_with_a_final_record(cells):
    train, val = cells
    history = fit(small_net(), train, val, steps=1000, steps_per_epoch=500, max_seconds=0.0,
                  **FAST)
    assert len(history.loss) == 1
    assert len(history.epochs) == 1 and "val_iou" in history.epochs[0]


@pytest.mark.gpu
def test_training_on_the_gpu_follows_the_cpu(cells):
    train, _ = cells
    on_cpu = fit(small_net(), train, steps=2, seed=4, **FAST)
    gpu_net = small_net().to("cupy")
    on_gpu = fit(gpu_net, train, steps=2, seed=4, **FAST)
    np.testing.assert_allclose(on_gpu.loss, on_cpu.loss, rtol=1e-3)
    assert gpu_net.device == "cupy"
