"""The parts of the training recipe around the step: the learning-rate schedule, keeping the
best epoch on validation, and networks with more than two classes."""

import numpy as np
import pytest
import torch

import minunet
from minunet.data import boundary_classes, synthetic_cells
from minunet.train import evaluate, fit, learning_rate


def test_cosine_schedule_equals_pytorch():
    steps, lr, min_lr = 17, 0.01, 1e-4
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps,
                                                           eta_min=min_lr)
    for step in range(steps):
        assert learning_rate("cosine", lr, min_lr, step, steps) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert learning_rate("constant", lr, min_lr, 5, steps) == lr


@pytest.fixture(scope="module")
def cells():
    images, labels = synthetic_cells(3, 48, seed=2)
    return (images[:2], labels[:2]), (images[2:], labels[2:])


def tiny_net(num_classes=2):
    return minunet.UNet(depth=2, base_channels=4, padding="same", batch_norm=True,
                        num_classes=num_classes, seed=0)


def test_keep_best_restores_the_epoch_that_scored_best(cells):
    train, val = cells
    net = tiny_net()
    history = fit(net, train, val, steps=5, steps_per_epoch=1, batch_size=2, tile_size=32,
                  lr=0.05, keep_best="pixel_error", progress=False, seed=1)
    errors = [epoch["val_pixel_error"] for epoch in history.epochs]
    assert history.best_epoch == int(np.argmin(errors)) + 1
    # the network now holds that epoch's weights: evaluating again gives its score
    assert evaluate(net, val)["pixel_error"] == pytest.approx(min(errors), abs=1e-12)


def test_keep_best_needs_validation_and_a_known_metric(cells):
    train, val = cells
    with pytest.raises(ValueError, match="keep_best needs val_data"):
        fit(tiny_net(), train, steps=1, keep_best="iou", progress=False)
    with pytest.raises(ValueError, match="keep_best must be one of"):
        fit(tiny_net(), train, val, steps=1, keep_best="accuracy", progress=False)


def test_three_class_network_trains_on_class_masks(cells):
    (images, labels), (val_images, val_labels) = cells
    classes = [boundary_classes(label, width=1) for label in labels]
    val_classes = [boundary_classes(label, width=1) for label in val_labels]
    net = tiny_net(num_classes=3)
    history = fit(net, (images, classes), (val_images, val_classes), steps=16,
                  steps_per_epoch=8, batch_size=2, tile_size=32, lr=0.02, progress=False,
                  keep_best="iou")
    assert np.mean(history.loss[-4:]) < np.mean(history.loss[:4])
    last = history.epochs[-1]
    assert {"val_iou_1", "val_iou_2", "val_iou", "val_pixel_error"} <= set(last)
    assert last["val_iou"] == pytest.approx((last["val_iou_1"] + last["val_iou_2"]) / 2)


def test_class_masks_must_fit_the_number_of_classes(cells):
    (images, labels), _ = cells
    instance_ids = [np.where(label > 0, 7, 0) for label in labels]
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        fit(tiny_net(num_classes=3), (images, instance_ids), steps=1, progress=False)
    classes = [boundary_classes(label) for label in labels]
    with pytest.raises(ValueError, match="weight_maps"):
        fit(tiny_net(num_classes=3), (images, classes), steps=1, weight_maps=True,
            progress=False)


def test_resume_refuses_other_settings_and_keeps_the_best_epoch(cells, tmp_path):
    train, val = cells
    path = tmp_path / "run.npz"
    settings = dict(steps_per_epoch=1, batch_size=2, tile_size=32, lr=0.05,
                    keep_best="pixel_error", progress=False, checkpoint_path=path)
    history = fit(tiny_net(), train, val, steps=3, **settings)
    with pytest.raises(ValueError, match="optimizer='adam' \\(now 'sgd'\\)"):
        fit(tiny_net(), train, val, steps=4, resume=True, **{**settings, "optimizer": "sgd"})
    with pytest.raises(ValueError, match="tile_size=32 \\(now 48\\)"):
        fit(tiny_net(), train, val, steps=4, resume=True, **{**settings, "tile_size": 48})
    # the same run, resumed for one more epoch: the best epoch among all four is kept
    net = tiny_net()
    resumed = fit(net, train, val, steps=4, resume=True, **settings)
    assert resumed.epochs[:3] == history.epochs
    errors = [epoch["val_pixel_error"] for epoch in resumed.epochs]
    assert resumed.best_epoch == int(np.argmin(errors)) + 1
    assert evaluate(net, val)["pixel_error"] == pytest.approx(min(errors), abs=1e-12)


def test_an_unwritable_checkpoint_path_is_refused_before_training(cells, tmp_path):
    train, _ = cells
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("")
    with pytest.raises(PermissionError, match="file.txt is not a writable folder"):
        fit(tiny_net(), train, steps=1, checkpoint_path=not_a_folder / "run.npz",
            progress=False)


def test_a_training_checkpoint_is_also_a_model_file(cells, tmp_path):
    train, _ = cells
    path = tmp_path / "run.npz"
    net = tiny_net()
    fit(net, train, steps=2, batch_size=2, tile_size=32, checkpoint_path=path,
        progress=False)
    loaded = minunet.load(path)  # what predict --model reads
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)
    model_file = tmp_path / "model.npz"
    minunet.save(net, model_file)
    with pytest.raises(ValueError, match="model file, not a training checkpoint"):
        fit(tiny_net(), train, steps=3, batch_size=2, tile_size=32, resume=True,
            checkpoint_path=model_file, progress=False)
