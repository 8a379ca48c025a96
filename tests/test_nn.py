"""Each layer's forward and backward against PyTorch autograd (float64, random upstream
gradients), plus the Module machinery: names, modes, state dicts, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from _unet_oracle import assert_close_to

from minunet import nn
from minunet.backend import to_device, to_numpy
from minunet.torch_reference import center_crop

DEVICES = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


def _autograd(fn, *arrays, grad_out):
    """Output of ``fn`` on tensors made from ``arrays`` and the gradients w.r.t. each."""
    tensors = [torch.from_numpy(to_numpy(a)).requires_grad_(True) for a in arrays]
    out = fn(*tensors)
    out.backward(torch.from_numpy(to_numpy(grad_out)))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def _check_layer(layer, x, torch_fn, rng, params=()):
    """Compare ``layer`` on ``x`` with ``torch_fn(x_t, *param tensors)``: output, input
    gradient and parameter gradients."""
    out = layer.forward(x)
    device = "numpy" if isinstance(x, np.ndarray) else "cupy"
    grad_out = to_device(rng.standard_normal(out.shape).astype(x.dtype), device)
    grad_x = layer.backward(grad_out)
    expected, grads = _autograd(torch_fn, x, *[p.data for p in params], grad_out=grad_out)
    assert out.dtype == x.dtype and grad_x.dtype == x.dtype
    assert_close_to(out, expected, 1e-10, what="output")
    assert_close_to(grad_x, grads[0], 1e-10, what="grad x")
    for p, g in zip(params, grads[1:], strict=True):
        assert_close_to(p.grad, g, 1e-10, what="parameter grad")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["valid", "same", 1])
def test_conv2d_layer(rng, device, padding):
    layer = nn.Conv2d(3, 5, (3, 2), padding=padding, dtype="float64", seed=0).to(device)
    layer.bias.data += to_device(rng.standard_normal(5), device)
    x = to_device(rng.standard_normal((2, 3, 7, 6)), device)
    _check_layer(layer, x, lambda x, w, b: TF.conv2d(x, w, b, padding=padding), rng,
                 (layer.weight, layer.bias))
    assert layer.forward(x).shape == layer.output_shape(x.shape)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_transpose2d_layer(rng, device):
    layer = nn.ConvTranspose2d(4, 3, 2, 2, dtype="float64", seed=0).to(device)
    layer.bias.data += to_device(rng.standard_normal(3), device)
    x = to_device(rng.standard_normal((2, 4, 5, 3)), device)
    _check_layer(layer, x, lambda x, w, b: TF.conv_transpose2d(x, w, b, stride=2), rng,
                 (layer.weight, layer.bias))
    assert layer.forward(x).shape == layer.output_shape(x.shape) == (2, 3, 10, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_max_pool2d_layer(rng, device):
    layer = nn.MaxPool2d(2)
    x = to_device(rng.standard_normal((2, 3, 8, 6)), device)
    _check_layer(layer, x, lambda x: TF.max_pool2d(x, 2, 2), rng)
    assert layer.output_shape(x.shape) == (2, 3, 4, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_layer(rng, device):
    x = rng.standard_normal((2, 3, 4, 5))
    x[0, 0, 0, :2] = 0.0  # the derivative at 0 is 0, as in PyTorch
    _check_layer(nn.ReLU(), to_device(x, device), TF.relu, rng)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_layer_backward_into_its_upstream_gradient(rng, device):
    """``backward(g, out=g)`` writes dL/dx over ``g`` (what DoubleConv does with the
    gradients it makes); the result is PyTorch's."""
    x = to_device(rng.standard_normal((2, 3, 4, 5)), device)
    layer = nn.ReLU()
    layer.forward(x)
    grad_out = to_device(rng.standard_normal((2, 3, 4, 5)), device)
    _, (expected,) = _autograd(TF.relu, x, grad_out=grad_out)
    assert layer.backward(grad_out, out=grad_out) is grad_out
    assert_close_to(grad_out, expected, 0, what="grad x")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_double_conv_matches_torch_and_keeps_the_callers_gradient(rng, batch_norm, overwrite):
    """DoubleConv's backward overwrites only gradients it made itself, unless the caller
    hands its ``grad_out`` over (``overwrite=True``); every gradient is PyTorch's."""
    block = nn.DoubleConv(2, 3, padding="same", batch_norm=batch_norm, dtype="float64",
                          seed=0)
    params = {name: torch.tensor(p.data, requires_grad=True)
              for name, p in block.named_parameters()}

    def torch_block(x):
        for conv, norm in (("conv1", "bn1"), ("conv2", "bn2")):
            x = TF.conv2d(x, params[f"{conv}.weight"], params[f"{conv}.bias"], padding=1)
            if batch_norm:
                x = TF.batch_norm(x, None, None, params[f"{norm}.weight"],
                                  params[f"{norm}.bias"], training=True)
            x = TF.relu(x)
        return x

    x = rng.standard_normal((2, 2, 7, 6))
    out = block.forward(x)
    grad_out = rng.standard_normal(out.shape)
    callers_copy = grad_out.copy()
    grad_x = block.backward(grad_out, overwrite=overwrite)
    assert np.array_equal(grad_out, callers_copy) != overwrite  # handed over: written over
    expected, (expected_grad_x,) = _autograd(torch_block, x, grad_out=callers_copy)
    assert_close_to(out, expected, 1e-10, what="output")
    assert_close_to(grad_x, expected_grad_x, 1e-10, what="grad x")
    for name, p in block.named_parameters():
        # With BatchNorm the convolutions' bias gradients are zero up to rounding (the
        # normalisation subtracts any constant): measure them by their weight's gradient.
        scale = np.abs(params[name.replace("bias", "weight")].grad.numpy()).max()
        assert_close_to(p.grad, params[name].grad.numpy(), 1e-10, scale, what=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_layer(rng, device, training):
    layer = nn.BatchNorm2d(3, momentum=0.3, dtype="float64").to(device)
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    layer.load_state_dict({**layer.state_dict(), "weight": gamma, "bias": beta})
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3,
                                                                                dtype=torch.float64)

    def torch_fn(x, w, b, training=training):
        return TF.batch_norm(x, running_mean, running_var, w, b, training=training,
                             momentum=0.3, eps=1e-5)

    warm_up = rng.standard_normal((4, 3, 5, 5)) * 3 + 1
    layer.forward(to_device(warm_up, device))  # the running statistics move
    torch_fn(torch.from_numpy(warm_up), torch.from_numpy(gamma), torch.from_numpy(beta), True)
    layer.train(training)
    x = to_device(rng.standard_normal((2, 3, 4, 5)) * 2 - 1, device)
    _check_layer(layer, x, torch_fn, rng, (layer.weight, layer.bias))
    assert_close_to(layer.running_mean, running_mean.numpy(), 1e-12, what="running mean")
    assert_close_to(layer.running_var, running_var.numpy(), 1e-12, what="running var")
    assert int(layer.num_batches_tracked) == 1 + training


def test_batch_norm_rejects_a_single_value_per_channel():
    with pytest.raises(ValueError, match="more than one value"):
        nn.BatchNorm2d(2, dtype="float64").forward(np.zeros((1, 2, 1, 1)))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_layer(rng, device):
    layer = nn.Dropout(0.3, seed=4)
    x = to_device(rng.standard_normal((4, 8, 16, 16)), device)
    out = layer.forward(x)
    kept = to_numpy(out) != 0
    assert abs(1 - kept.mean() - 0.3) < 0.02  # ~30% dropped
    scale = kept / 0.7
    _, (expected_grad,) = _autograd(lambda t: t * torch.from_numpy(scale), x,
                                    grad_out=np.ones(x.shape))
    np.testing.assert_allclose(to_numpy(out), to_numpy(x) * scale, rtol=1e-15)
    np.testing.assert_allclose(to_numpy(layer.backward(to_device(np.ones(x.shape), device))),
                               expected_grad, rtol=1e-15)
    again = nn.Dropout(0.3, seed=4).forward(x)  # seeded: the same mask
    np.testing.assert_array_equal(to_numpy(again), to_numpy(out))
    layer.eval()
    assert layer.forward(x) is x and layer.backward(x) is x
    with pytest.raises(ValueError, match="probability"):
        nn.Dropout(1.0)


@pytest.mark.parametrize("shares", [1, 3, 9], ids=["one thread", "3 shares", "9 shares"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip_hw, up_hw", [((9, 8), (4, 4)), ((7, 6), (7, 3)), ((5, 5), (2, 4))])
def test_crop_concat_with_odd_and_even_crops(rng, device, skip_hw, up_hw, shares, monkeypatch):
    from minunet.functional import threads

    # runs of the output's channels, some across the two parts, on several threads
    monkeypatch.setattr(threads, "blas_threads", lambda: shares)
    monkeypatch.setattr(threads, "ELEMENTWISE_MIN_SIZE", 1)
    layer = nn.CropConcat()
    skip = to_device(rng.standard_normal((2, 3, *skip_hw)), device)
    up = to_device(rng.standard_normal((2, 4, *up_hw)), device)
    out = layer.forward(skip, up)
    assert out.shape == layer.output_shape(skip.shape, up.shape) == (2, 7, *up_hw)
    grad_out = rng.standard_normal(out.shape)
    grad_skip, grad_up = layer.backward(to_device(grad_out, device))
    expected, (expected_skip, expected_up) = _autograd(
        lambda s, u: torch.cat([center_crop(s, *up_hw), u], dim=1), skip, up, grad_out=grad_out)
    np.testing.assert_array_equal(to_numpy(out), expected)
    np.testing.assert_array_equal(to_numpy(grad_skip), expected_skip)
    np.testing.assert_array_equal(to_numpy(grad_up), expected_up)
    # the odd pixel is cut at the bottom/right: the window starts at floor(difference / 2)
    rows, cols = nn.CropConcat.crop_window(skip_hw, up_hw)
    assert rows.start == (skip_hw[0] - up_hw[0]) // 2 and cols.start == (skip_hw[1] - up_hw[1]) // 2


def test_crop_concat_rejects_a_larger_up_map():
    with pytest.raises(ValueError, match="crop"):
        nn.CropConcat().forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 5, 4)))


def test_backward_before_forward_raises():
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Conv2d(1, 1, 3, dtype="float64").backward(np.zeros((1, 1, 2, 2)))


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(2, 2, 3, dtype="float64"), nn.ConvTranspose2d(2, 2, dtype="float64"), nn.ReLU(),
     nn.MaxPool2d(2), nn.BatchNorm2d(2, dtype="float64")],
    ids=lambda layer: type(layer).__name__,
)
def test_backward_releases_what_forward_cached(layer, rng):
    # As PyTorch frees a graph's saved tensors: the cached maps are gone after one backward,
    # so a second one needs a new forward instead of silently reusing stale inputs.
    out = layer.forward(rng.standard_normal((1, 2, 6, 6)))
    layer.backward(np.ones_like(out))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones_like(out))
    layer.backward(np.ones_like(layer.forward(rng.standard_normal((1, 2, 6, 6)))))


def test_crop_concat_backward_releases_its_cache(rng):
    layer = nn.CropConcat()
    out = layer.forward(rng.standard_normal((1, 2, 8, 8)), rng.standard_normal((1, 3, 6, 6)))
    layer.backward(np.ones_like(out))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones_like(out))


def test_module_names_modes_and_state_dict(rng):
    block = nn.DoubleConv(2, 3, batch_norm=True, dtype="float64", seed=0)
    names = [name for name, _ in block.named_parameters()]
    assert names == ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias",
                     "conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias"]
    torch_block = torch.nn.ModuleDict({"conv1": torch.nn.Conv2d(2, 3, 3),
                                       "bn1": torch.nn.BatchNorm2d(3),
                                       "conv2": torch.nn.Conv2d(3, 3, 3),
                                       "bn2": torch.nn.BatchNorm2d(3)})
    assert set(block.state_dict()) == set(torch_block.state_dict())
    block.eval()
    assert not any(m.training for m in block.modules())
    block.train()
    assert all(m.training for m in block.modules())

    state = {k: v + 1 for k, v in block.state_dict().items()}
    block.load_state_dict(state)
    for key, value in block.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    state["conv1.weight"] = state["conv1.weight"][:, :1]
    with pytest.raises(ValueError, match="conv1.weight"):
        block.load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        block.load_state_dict({})


def test_layers_keep_float32(rng):
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    for layer in (nn.Conv2d(2, 2, 3, dtype="float32"), nn.BatchNorm2d(2), nn.ReLU(),
                  nn.MaxPool2d(2), nn.Dropout(0.5, seed=0), nn.ConvTranspose2d(2, 2)):
        out = layer.forward(x)
        assert out.dtype == np.float32, type(layer).__name__
        assert layer.backward(np.ones_like(out)).dtype == np.float32, type(layer).__name__
    with pytest.raises(TypeError, match="dtype"):
        nn.Conv2d(1, 1, 3, dtype="int32")
