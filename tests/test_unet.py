"""The U-Net against its PyTorch twin, a finite-difference check, and its shape arithmetic."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from _unet_oracle import assert_close_to, assert_gradients_match, twin_networks

import minunet.unet
from minunet import UNet, losses, torch_reference
from minunet.backend import to_device, to_numpy
from minunet.optim import Adam
from minunet.unet import unet_parameter_count

SMALL = dict(in_channels=2, num_classes=3, depth=3, base_channels=4)
TOLERANCE = {"float64": 1e-8, "float32": 1e-4}


def _forward_backward_both(net, torch_net, x, grad_logits):
    """Run forward and backward through both networks; return (logits, grad_x) of each."""
    logits = net.forward(x)
    grad_x = net.backward(grad_logits)
    x_t = torch.from_numpy(to_numpy(x)).requires_grad_(True)
    logits_t = torch_net(x_t)
    logits_t.backward(torch.from_numpy(to_numpy(grad_logits)))
    return (logits, grad_x), (logits_t.detach().numpy(), x_t.grad.numpy())


@pytest.mark.parametrize("device", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_small_unet_matches_torch(rng, padding, batch_norm, dtype, device):
    net, torch_net = twin_networks(**SMALL, padding=padding, batch_norm=batch_norm,
                                   dtype=dtype, seed=1)
    net.to(device)
    size = net.valid_input_size(30)
    x = to_device(rng.standard_normal((2, 2, size, size + 4 * (padding == "same")))
                  .astype(dtype), device)
    grad_logits = rng.standard_normal((2, 3, net.output_size(size),
                                       net.output_size(x.shape[3]))).astype(dtype)
    grad_logits = to_device(grad_logits, device)
    (logits, grad_x), (logits_t, grad_x_t) = _forward_backward_both(net, torch_net, x,
                                                                    grad_logits)
    rtol = TOLERANCE[dtype]
    assert logits.dtype == dtype and grad_x.dtype == dtype
    assert_close_to(logits, logits_t, rtol, what="logits")
    assert_close_to(grad_x, grad_x_t, rtol, what="grad wrt input")
    assert_gradients_match(net.to("numpy"), torch_net, rtol)
    if batch_norm:  # the running statistics were updated identically
        torch_state = torch_net.state_dict()
        for name, value in net.state_dict().items():
            assert_close_to(value, torch_state[name].numpy(), rtol, what=name)


@pytest.mark.parametrize("device", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_backward_without_input_gradient_matches_torch(rng, padding, batch_norm, device):
    """As training runs it: no gradient for the images (None), and every parameter's
    gradient PyTorch's for an input that requires none."""
    net, torch_net = twin_networks(**SMALL, padding=padding, batch_norm=batch_norm,
                                   dtype="float64", seed=2)
    net.to(device)
    size = net.valid_input_size(30)
    x = rng.standard_normal((2, 2, size, size))
    grad_logits = rng.standard_normal((2, 3, *[net.output_size(size)] * 2))
    net.forward(to_device(x, device))
    assert net.backward(to_device(grad_logits, device), input_gradient=False) is None
    torch_net(torch.from_numpy(x)).backward(torch.from_numpy(grad_logits))
    assert_gradients_match(net.to("numpy"), torch_net, TOLERANCE["float64"])


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_eval_mode_with_batch_norm_and_dropout_matches_torch(rng, padding):
    net, torch_net = twin_networks(**SMALL, padding=padding, batch_norm=True, dropout=0.5,
                                   dtype="float64", seed=2)
    size = net.valid_input_size(30)
    x = rng.standard_normal((2, 2, size, size))
    # Move the running statistics away from their initial values (with dropout switched off:
    # the two libraries draw different masks, which would change the decoder's statistics).
    net.dropout.eval()
    torch_net.dropout.eval()
    for _ in range(2):
        net.forward(x)
        torch_net(torch.from_numpy(x))
    net.eval()
    torch_net.eval()
    assert all(not m.training for m in net.modules())
    grad_logits = rng.standard_normal((2, 3, net.output_size(size), net.output_size(size)))
    (logits, grad_x), (logits_t, grad_x_t) = _forward_backward_both(net, torch_net, x,
                                                                    grad_logits)
    assert_close_to(logits, logits_t, 1e-8, what="logits")
    assert_close_to(grad_x, grad_x_t, 1e-8, what="grad wrt input")
    assert_gradients_match(net, torch_net, 1e-8)


def test_dropout_is_active_in_training_and_applied_to_the_bottom_level(rng):
    net = UNet(**SMALL, dropout=0.5, dtype="float64", seed=3)
    x = rng.standard_normal((1, 2, 44, 44))
    first, second = net.forward(x), net.forward(x)
    assert not np.allclose(first, second)  # a new mask each time
    # the mask covers the bottom level's output: (N, 4 * base_channels, 4, 4) for 44x44
    assert net.dropout._scale.shape == (1, 16, 4, 4)
    net.eval()
    np.testing.assert_array_equal(net.forward(x), net.forward(x))


@pytest.mark.slow
def test_paper_configuration_matches_torch_at_572(rng):
    """The full network of the paper (31M parameters), one 572x572 tile, float32.

    The logits agree to float32 rounding. Gradients are compared by relative norm: at this
    size float32 rounding flips a few of the ~10^8 ReLU and max-pool decisions (values
    within rounding of zero, near-ties in a pooling window), which moves the gradients of
    minunet and of PyTorch alike by ~0.3% (input gradient ~1.5%) away from a float64
    computation; a wrong gradient would be off by order 1. The small configurations above
    check gradients element-wise to 1e-4 (float32) and 1e-8 (float64).
    """
    net, torch_net = twin_networks(seed=4)
    x = rng.standard_normal((1, 1, 572, 572)).astype(np.float32)
    grad_logits = rng.standard_normal((1, 2, 388, 388)).astype(np.float32)
    (logits, grad_x), (logits_t, grad_x_t) = _forward_backward_both(net, torch_net, x,
                                                                    grad_logits)
    assert logits.shape == (1, 2, 388, 388)
    assert_close_to(logits, logits_t, 1e-4, what="logits")

    def relative_error(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert relative_error(grad_x, grad_x_t) < 5e-2
    torch_params = dict(torch_net.named_parameters())
    errors = {name: relative_error(p.grad, torch_params[name].grad.numpy())
              for name, p in net.named_parameters()}
    assert max(errors.values()) < 2e-2, errors


def test_finite_difference_directional_derivatives(rng):
    """d/dt L(theta + t v) at t = 0 by central differences equals <grad, v>, for random unit
    vectors v in parameter space and in input space (float64, BatchNorm included)."""
    net = UNet(in_channels=1, num_classes=2, depth=3, base_channels=2, batch_norm=True,
               dtype="float64", seed=5)
    x = rng.standard_normal((2, 1, 44, 44))
    target = rng.integers(0, 2, size=(2, 4, 4))
    weight = rng.uniform(0.5, 2.0, size=(2, 4, 4))
    params = net.parameters()

    def loss_at(x):
        return float(losses.softmax_cross_entropy(net.forward(x), target, weight)[0])

    net.zero_grad()
    _, grad_logits = losses.softmax_cross_entropy(net.forward(x), target, weight)
    grad_x = net.backward(grad_logits)
    step = 1e-5
    for _ in range(3):
        directions = [rng.standard_normal(p.shape) for p in params]
        norm = np.sqrt(sum((d**2).sum() for d in directions))
        directions = [d / norm for d in directions]
        analytic = sum((p.grad * d).sum() for p, d in zip(params, directions, strict=True))
        values = []
        for sign in (1, -1):
            for p, d in zip(params, directions, strict=True):
                p.data += sign * step * d
            values.append(loss_at(x))
            for p, d in zip(params, directions, strict=True):
                p.data -= sign * step * d
        numeric = (values[0] - values[1]) / (2 * step)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-10)

        direction_x = rng.standard_normal(x.shape)
        direction_x /= np.linalg.norm(direction_x)
        numeric_x = (loss_at(x + step * direction_x) - loss_at(x - step * direction_x)) / (2 * step)
        np.testing.assert_allclose((grad_x * direction_x).sum(), numeric_x, rtol=1e-6,
                                   atol=1e-10)


def test_gradients_accumulate_until_zero_grad(rng):
    net = UNet(**SMALL, dtype="float64", seed=6)
    x = rng.standard_normal((1, 2, 44, 44))
    g = rng.standard_normal((1, 3, 4, 4))
    net.forward(x)
    net.backward(g)
    once = [p.grad.copy() for p in net.parameters()]
    net.forward(x)
    net.backward(g)
    for p, single in zip(net.parameters(), once, strict=True):
        np.testing.assert_allclose(p.grad, 2 * single, rtol=1e-12, atol=1e-300)
    net.zero_grad()
    assert all(not p.grad.any() for p in net.parameters())


def test_forward_does_not_mutate_its_input(rng):
    net = UNet(**SMALL, dtype="float64", seed=7)
    x = rng.standard_normal((1, 2, 44, 44))
    copy = x.copy()
    net.backward(np.ones_like(net.forward(x)))
    np.testing.assert_array_equal(x, copy)


# --- shape arithmetic ---------------------------------------------------------------------


def test_paper_sizes():
    net = UNet(base_channels=1)  # the sizes do not depend on the channel counts
    assert net.output_size(572) == 388
    assert net.valid_input_size(1) == 188
    assert net.valid_input_size(560) == 572
    assert net.input_size_for_output(388) == 572
    assert net.input_size_for_output(389) == 588
    valid = [n for n in range(1, 700) if net.valid_input_size(n) == n]
    assert valid == list(range(188, 700, 16))  # 12 mod 16, from 188 on


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_input_size_for_output_inverts_output_size(padding, depth):
    net = UNet(depth=depth, base_channels=1, padding=padding)
    for wanted in (1, 5, 17, 64, 100):
        size = net.input_size_for_output(wanted)
        assert net.output_size(size) >= wanted
        smaller = [n for n in range(1, size) if net.valid_input_size(n) == n]
        assert all(net.output_size(n) < wanted for n in smaller)


def test_output_size_matches_a_real_forward_pass(rng):
    for padding in ("valid", "same"):
        net = UNet(**SMALL, padding=padding, seed=0)
        for size in (net.valid_input_size(40), net.valid_input_size(61)):
            x = rng.standard_normal((1, 2, size, size)).astype(np.float32)
            assert net.forward(x).shape == (1, 3, net.output_size(size), net.output_size(size))


def test_invalid_inputs_raise_helpful_errors(rng):
    net = UNet(base_channels=1)
    with pytest.raises(ValueError, match="556 or 572"):
        net.forward(np.zeros((1, 1, 570, 572), np.float32))
    with pytest.raises(ValueError, match="width"):
        net.forward(np.zeros((1, 1, 572, 571), np.float32))
    with pytest.raises(ValueError, match="188"):
        net.output_size(100)
    with pytest.raises(ValueError, match="channels"):
        net.forward(np.zeros((1, 3, 572, 572), np.float32))
    with pytest.raises(TypeError, match="float32"):
        net.forward(np.zeros((1, 1, 572, 572), np.float64))
    with pytest.raises(ValueError, match="4-D"):
        net.forward(np.zeros((1, 572, 572), np.float32))
    same = UNet(depth=3, base_channels=2, padding="same")
    with pytest.raises(ValueError, match="divisible by 4"):
        same.forward(np.zeros((1, 1, 30, 30), np.float32))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"padding": "full"}, "padding"), ({"depth": 0}, "depth"), ({"dtype": "float16"}, "dtype"),
     ({"base_channels": 2.5}, "base_channels"), ({"dropout": 1.0}, "dropout")],
)
def test_invalid_configuration_raises(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        UNet(**kwargs)


# --- summary, initialisation, config ----------------------------------------------------------


def test_summary_of_the_paper_network():
    net = UNet(seed=0)
    table = net.summary_table(572)
    torch_count = sum(p.numel() for p in torch_reference.TorchUNet().parameters())
    assert table.total_params == torch_count  # 31,030,658
    assert sum(row["params"] for row in table.rows) == table.total_params
    assert table.output_shape == (1, 2, 388, 388)
    assert table.rows[-1]["layer"] == "head"
    assert table.activation_bytes == sum(4 * np.prod(r["output_shape"]) for r in table.rows)
    assert net.summary_table(572, batch=2).activation_bytes == 2 * table.activation_bytes
    narrow = [UNet(base_channels=2, dtype=d).summary_table(572) for d in ("float32", "float64")]
    assert narrow[1].activation_bytes == 2 * narrow[0].activation_bytes
    text = net.summary(572)
    assert f"{torch_count:,}" in text and "388" in text and f"{table.receptive_field}" in text


def test_receptive_field_equals_the_measured_dependence_region(monkeypatch):
    """Replace max-pooling by average pooling in the torch twin (so every input of a window
    influences the output) and measure, with autograd, how many input rows each output row
    depends on; the widest region is the receptive field."""
    monkeypatch.setattr(torch_reference.F, "max_pool2d", TF.avg_pool2d)
    for depth in (3, 4):
        net = UNet(depth=depth, base_channels=1)
        torch_net = torch_reference.TorchUNet(1, 1, depth, 1).double()
        with torch.no_grad():
            for p in torch_net.parameters():
                p.uniform_(0.1, 1.0)  # positive weights and inputs: every ReLU is active
        size = net.input_size_for_output(2**depth)
        x = torch.rand(1, 1, size, net.valid_input_size(1), dtype=torch.float64) + 0.1
        x.requires_grad_(True)
        y = torch_net(x)
        widest = 0
        for row in range(y.shape[2]):
            (grad,) = torch.autograd.grad(y[0, 0, row].sum(), x, retain_graph=True)
            rows = torch.nonzero(grad[0, 0].abs().sum(1)).flatten()
            widest = max(widest, int(rows.max() - rows.min()) + 1)
        assert net.receptive_field() == widest


def test_he_initialisation_is_seeded_and_has_the_paper_statistics():
    first, second, other = (UNet(base_channels=32, seed=s) for s in (11, 11, 12))
    for (name, a), (_, b), (_, c) in zip(first.named_parameters(), second.named_parameters(),
                                         other.named_parameters(), strict=True):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
        if name.endswith("bias"):
            assert not a.data.any()
        else:
            assert not np.array_equal(a.data, c.data)
    conv = first.encoder[3].conv2.weight.data  # (256, 256, 3, 3): N = 9 * 256
    assert abs(conv.std() / np.sqrt(2 / (9 * 256)) - 1) < 0.01
    assert abs(conv.mean()) < 0.01 * conv.std()
    up = first.upconv[3].weight.data  # (512, 256, 2, 2): N = C_in = 512
    assert abs(up.std() / np.sqrt(2 / 512) - 1) < 0.01


def test_config_round_trips_through_the_constructor():
    net = UNet(in_channels=3, num_classes=4, depth=4, base_channels=8, padding="same",
               dtype="float64", batch_norm=True, dropout=0.25, seed=9)
    again = UNet(**net.config)
    assert again.config == net.config
    for (_, a), (_, b) in zip(net.named_parameters(), again.named_parameters(), strict=True):
        np.testing.assert_array_equal(a.data, b.data)


# --- Memory, known before anything is allocated ---------------------------------------------


@pytest.mark.parametrize("config", [{}, dict(depth=3, base_channels=8, batch_norm=True,
                                             in_channels=3, num_classes=4),
                                    dict(depth=1, base_channels=5)])
def test_parameter_count_from_the_configuration_equals_torchs(config):
    """The closed form against the PyTorch twin's own count (no weights allocated by us)."""
    torch_net = torch_reference.TorchUNet(**config)
    expected = sum(p.numel() for p in torch_net.parameters())
    assert unet_parameter_count(**config) == expected
    if config:  # the paper's network is counted by test_summary_of_the_paper_network
        assert sum(p.data.size for p in UNet(**config).parameters()) == expected


def test_a_network_too_large_for_the_memory_is_refused_before_allocating(monkeypatch,
                                                                         time_limit):
    """depth=12 with 8 base channels has 8.0e9 weights (29.7 GiB): refused with the numbers,
    in no time, instead of being killed by the OS half-way through the allocation."""
    monkeypatch.setattr(minunet.unet, "available_memory_bytes", lambda device: 8 * 2**30)
    with time_limit(10), pytest.raises(MemoryError, match=r"depth=12.*29\.7 GiB.*8\.0 GiB"):
        UNet(depth=12, base_channels=8)


def _peak_of_a_training_step(net, runner, rng) -> int:
    """The most memory (bytes, tracemalloc) one Adam step of ``runner`` (the network or a
    BatchSplit of it) allocates on four 64x64 tiles, measured on the second step: the
    optimizer's state (and any replica) exists from the first one on."""
    optimizer = Adam(net.parameters(), lr=1e-3)
    x = rng.random((4, 1, 64, 64), dtype=np.float32)
    target = rng.integers(0, 2, (4, 64, 64))

    def step():
        runner.zero_grad()
        _, grad = losses.softmax_cross_entropy(runner.forward(x), target)
        runner.backward(grad, input_gradient=False)  # as training runs it
        optimizer.step()

    step()
    for module in net.modules():
        module._clear_cache()
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_training_memory_estimate_bounds_the_measured_peak(rng):
    net = UNet(depth=3, base_channels=8, padding="same", batch_norm=True, seed=0)
    peak = _peak_of_a_training_step(net, net, rng)
    # weights, gradients and Adam's two moments were allocated before the measurement
    existing = 4 * sum(p.data.nbytes for p in net.parameters())
    estimate = net.training_memory_bytes(64, 4)
    assert peak + existing <= estimate <= 3 * (peak + existing)


def test_training_memory_estimate_counts_the_replicas_of_a_split_batch(rng):
    from minunet.parallel import BatchSplit

    net = UNet(depth=3, base_channels=8, padding="same", seed=0)
    peak = _peak_of_a_training_step(net, BatchSplit(net, threads=2), rng)
    # weights, gradients, Adam's two moments and the replica's gradients came before
    existing = 5 * sum(p.data.nbytes for p in net.parameters())
    estimate = net.training_memory_bytes(64, 4, shares=2)
    assert estimate - net.training_memory_bytes(64, 4) == existing // 5  # one replica
    assert peak + existing <= estimate
