"""The CUDA kernels against the NumPy kernels, through :mod:`minunet.cuda.ops`.

Every test runs twice: on the CPU emulation of the CUDA execution model
(:mod:`minunet.cuda.emulator`: the same ``.cu`` sources compiled with g++, launched by the
same host code in :mod:`minunet.cuda.ops`), and on a GPU through CuPy (marked ``gpu``;
skipped without one). The oracles are :mod:`minunet.functional`, :mod:`minunet.losses`
(tested against PyTorch by their own tests) and ``torch.optim``.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from minunet import cuda, losses
from minunet import functional as F
from minunet.backend import gpu_available, to_numpy
from minunet.cuda import ops
from minunet.cuda.emulator import EmulatedRunner, compiler

ALGORITHMS = ops.ALGORITHMS
TOLERANCE = {"float64": dict(rtol=1e-10, atol=1e-10), "float32": dict(rtol=2e-5, atol=2e-5)}


@pytest.fixture(scope="session")
def emulated_runner(tmp_path_factory):
    """All kernel files compiled for the CPU emulation (once per dtype, on first use)."""
    if compiler() is None:
        pytest.skip("the CPU emulation of the CUDA kernels needs g++ (apt install g++)")
    return EmulatedRunner(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture
def on_emulator(emulated_runner, monkeypatch):
    """:mod:`minunet.cuda.ops` launches its kernels on the CPU emulation in this test."""
    monkeypatch.setattr(ops, "gpu_runner", lambda: emulated_runner)
    return emulated_runner


class Device:
    """Runs an op of :mod:`minunet.cuda.ops` on NumPy inputs and returns NumPy outputs."""

    def __init__(self, put):
        self.put = put  # NumPy array -> array of the device

    def __call__(self, op: str, *args, **kwargs):
        def moved(a):
            return self.put(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a

        result = getattr(ops, op)(*map(moved, args), **{k: moved(v) for k, v in kwargs.items()})
        if isinstance(result, tuple):
            return tuple(None if r is None else to_numpy(r) for r in result)
        return None if result is None else to_numpy(result)


@pytest.fixture(params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def device(request) -> Device:
    if request.param == "emulated":
        return Device(request.getfixturevalue("on_emulator").contiguous)
    return Device(ops.gpu_runner().xp.asarray)


def assert_close(actual, expected, dtype):
    assert actual.dtype == np.dtype(dtype)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, **TOLERANCE[np.dtype(dtype).name])


# --- Convolution ----------------------------------------------------------------------------

CONV_CASES = {
    # name: (x shape, weight shape (C_out, C_in, kH, kW), keyword arguments)
    "strided-padded-dilated": ((2, 3, 9, 8), (4, 3, 3, 2),
                               dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    "same-even-kernel": ((1, 2, 7, 10), (18, 2, 2, 4), dict(padding="same")),  # 2 row tiles
    "valid-deep": ((2, 5, 6, 6), (3, 5, 3, 3), dict(padding="valid")),  # 45 taps: 3 k-steps
    "pointwise-strided": ((3, 4, 5, 7), (6, 4, 1, 1), dict(stride=3)),
    "full-dilated": ((1, 1, 4, 5), (2, 1, 3, 2), dict(padding="full", dilation=(2, 1))),
    # 65 output channels, 70 pixels, 27 taps: two 64-wide blocks each way with ragged edges,
    # and a weight gradient split over two depth slices
    "ragged-blocks": ((2, 3, 5, 7), (65, 3, 3, 3), dict(padding=1)),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_and_backward(device, case, algorithm, dtype, rng):
    x_shape, w_shape, kwargs = CONV_CASES[case]
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal(w_shape).astype(dtype)
    bias = rng.standard_normal(w_shape[0]).astype(dtype)

    expected = F.conv2d(x, weight, bias, **kwargs)
    assert_close(device("conv2d", x, weight, bias, algorithm=algorithm, **kwargs), expected,
                 dtype)
    assert_close(device("conv2d", x, weight, algorithm=algorithm, **kwargs),
                 F.conv2d(x, weight, **kwargs), dtype)

    grad_out = rng.standard_normal(expected.shape).astype(dtype)
    got = device("conv2d_backward", grad_out, x, weight, algorithm=algorithm, **kwargs)
    for actual, wanted in zip(got, F.conv2d_backward(grad_out, x, weight, **kwargs),
                              strict=True):
        assert_close(actual, wanted, dtype)
    without_x = device("conv2d_backward", grad_out, x, weight, algorithm=algorithm,
                       input_gradient=False, **kwargs)
    assert without_x[0] is None
    for actual, wanted in zip(without_x[1:], got[1:], strict=True):
        assert_close(actual, wanted, dtype)


TRANSPOSE_CASES = {
    # name: (x shape, weight shape (C_in, C_out, kH, kW), keyword arguments)
    "unet-up-convolution": ((2, 3, 4, 5), (3, 4, 2, 2), dict(stride=2)),
    "up-convolution-ragged": ((1, 9, 3, 7), (9, 17, 2, 2), dict(stride=2)),  # 68 rows (k, a, b)
    "unequal-strides": ((1, 2, 5, 4), (2, 18, 3, 2),
                        dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2))),
    "dilated": ((2, 2, 4, 4), (2, 3, 3, 2), dict(padding=1, dilation=2, output_padding=1)),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_conv_transpose2d_forward_and_backward(device, case, algorithm, dtype, rng):
    x_shape, w_shape, kwargs = TRANSPOSE_CASES[case]
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal(w_shape).astype(dtype)
    bias = rng.standard_normal(w_shape[1]).astype(dtype)

    expected = F.conv_transpose2d(x, weight, bias, **kwargs)
    assert_close(device("conv_transpose2d", x, weight, bias, algorithm=algorithm, **kwargs),
                 expected, dtype)
    grad_out = rng.standard_normal(expected.shape).astype(dtype)
    got = device("conv_transpose2d_backward", grad_out, x, weight, algorithm=algorithm,
                 **kwargs)
    wanted = F.conv_transpose2d_backward(grad_out, x, weight, **kwargs)
    for actual, oracle in zip(got, wanted, strict=True):
        assert_close(actual, oracle, dtype)
    without_x = device("conv_transpose2d_backward", grad_out, x, weight, algorithm=algorithm,
                       input_gradient=False, **kwargs)
    assert without_x[0] is None
    for actual, oracle in zip(without_x[1:], wanted[1:], strict=True):
        assert_close(actual, oracle, dtype)


def test_conv2d_rejects_bad_arguments(device, rng):
    x = rng.standard_normal((1, 2, 5, 5))
    with pytest.raises(ValueError, match="algorithm"):
        device("conv2d", x, rng.standard_normal((3, 2, 3, 3)), algorithm="fast")
    with pytest.raises(ValueError, match="input channels"):  # the NumPy kernels' own checks
        device("conv2d", x, rng.standard_normal((3, 4, 3, 3)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conv2d_with_fused_relu(device, algorithm, dtype, rng):
    x = rng.standard_normal((2, 3, 6, 5)).astype(dtype)
    weight = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype)
    expected = np.maximum(F.conv2d(x, weight, bias, padding=1), 0)
    assert_close(device("conv2d", x, weight, bias, padding=1, relu=True, algorithm=algorithm),
                 expected, dtype)


@pytest.mark.parametrize("rung", ["blocked", "pipelined"])
def test_split_k_weight_gradient_is_right_and_bit_reproducible(on_emulator, rung, rng):
    """A long depth (2*10*10 pixels) over few output tiles: the weight gradient is split into
    depth slices summed in a fixed order, which gives the same bits on every call."""
    x, weight = rng.standard_normal((2, 2, 12, 12)), rng.standard_normal((3, 2, 3, 3))
    grad_out = rng.standard_normal((2, 3, 10, 10))
    assert 200 // ops._split_depth(3, 18, 200) >= 2  # several slices
    before = on_emulator.launched.get("conv2d_sum_splits", 0)
    first = ops.conv2d_backward(grad_out, x, weight, algorithm=rung)[1]
    again = ops.conv2d_backward(grad_out, x, weight, algorithm=rung)[1]
    assert on_emulator.launched["conv2d_sum_splits"] == before + 2
    np.testing.assert_array_equal(first, again)
    assert_close(first, F.conv2d_backward(grad_out, x, weight)[1], "float64")


def test_split_depth_covers_the_depth_in_whole_steps():
    for rows, cols, depth in [(64, 576, 324900), (1024, 4608, 784), (3, 18, 200), (2, 8, 5)]:
        split = ops._split_depth(rows, cols, depth)
        slices = -(-depth // split)
        assert split % ops.BLOCK_DEPTH == 0 and (slices - 1) * split < depth <= slices * split
        blocks = -(-rows // ops.BLOCK_ROWS) * -(-cols // ops.BLOCK_COLS)
        assert slices == 1 or blocks * slices <= 2 * ops.SPLIT_TARGET_BLOCKS


def test_sizes_beyond_int_indices_are_refused_before_allocating(device):
    x, weight = np.ones((1, 1, 2, 2)), np.ones((1, 1, 1, 1))
    with pytest.raises(ValueError, match="32-bit int"):  # a 50001 x 50001 output
        device("conv_transpose2d", x, weight, stride=50000)


# --- Max-pooling ----------------------------------------------------------------------------

POOL_CASES = {
    "unet-2x2": ((2, 3, 8, 8), dict(kernel_size=2)),
    "3x3-stride-2-padded": ((1, 2, 9, 7), dict(kernel_size=3, stride=2, padding=1)),
    "overlapping-rows": ((2, 1, 6, 9), dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0))),
    "stride-1": ((1, 2, 5, 5), dict(kernel_size=(2, 3), stride=1)),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d_forward_and_backward_with_ties(device, case, dtype, rng):
    shape, kwargs = POOL_CASES[case]
    x = rng.integers(0, 3, shape).astype(dtype)  # few distinct values: many tied maxima
    expected, indices = F.max_pool2d(x, return_indices=True, **kwargs)
    y, got_indices = device("max_pool2d", x, return_indices=True, **kwargs)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(got_indices, indices)
    assert got_indices.dtype == np.int64

    grad_out = rng.standard_normal(expected.shape).astype(dtype)
    wanted = F.max_pool2d_backward(grad_out, x, **kwargs)
    assert_close(device("max_pool2d_backward", grad_out, x, **kwargs), wanted, dtype)
    assert_close(device("max_pool2d_backward", grad_out, x, indices=indices, **kwargs), wanted,
                 dtype)


def test_max_pool2d_nan_wins(device):
    x = np.array([[[[1.0, np.nan], [3.0, 2.0]]]])
    y, indices = device("max_pool2d", x, 2, return_indices=True)
    assert np.isnan(y).all() and indices.ravel().tolist() == [1]


# --- Reductions, activations, loss ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (2, 5, 17, 19), (4, 1, 300)])
def test_channel_sum(device, shape, rng):
    x = rng.standard_normal(shape)
    axes = (0, *range(2, len(shape)))
    assert_close(device("channel_sum", x), x.sum(axis=axes), "float64")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_relu_and_its_gradient(device, dtype, rng):
    x = rng.standard_normal((3, 4, 5, 7)).astype(dtype)
    x[0, 0, 0, :3] = 0  # the kink: gradient 0 there, as in PyTorch
    grad_out = rng.standard_normal(x.shape).astype(dtype)
    assert_close(device("relu", x), np.maximum(x, 0), dtype)
    assert_close(device("relu_backward", grad_out, x), np.where(x > 0, grad_out, 0), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_relu_in_place_and_special_values_as_torch(device, dtype, rng):
    """The ReLU writing over its input (``out=x``), and NaN, -0.0 and infinities, forward
    and backward, against PyTorch."""
    import torch

    x = rng.standard_normal((2, 3, 5, 7)).astype(dtype)
    x.flat[:5] = [np.nan, -0.0, 0.0, np.inf, -np.inf]
    grad_out = rng.standard_normal(x.shape).astype(dtype)
    x_t = torch.tensor(x, requires_grad=True)
    y_t = torch.relu(x_t)
    y_t.backward(torch.tensor(grad_out))
    on_device = device.put(x.copy())
    assert ops.relu(on_device, out=on_device) is on_device
    np.testing.assert_array_equal(to_numpy(on_device), y_t.detach().numpy())
    np.testing.assert_array_equal(device("relu_backward", grad_out, x), x_t.grad.numpy())
    grad_on_device = device.put(grad_out.copy())
    assert ops.relu_backward(grad_on_device, device.put(x), out=grad_on_device) is grad_on_device
    np.testing.assert_array_equal(to_numpy(grad_on_device), x_t.grad.numpy())
    with pytest.raises(ValueError, match="out"):
        ops.relu(device.put(x), out=device.put(x[:1]))
    with pytest.raises(ValueError, match="out"):
        ops.relu_backward(device.put(grad_out), device.put(x), out=device.put(x[:1]))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_cross_entropy(device, dtype, weighted, rng):
    logits = (3 * rng.standard_normal((2, 3, 5, 4))).astype(dtype)
    target = rng.integers(0, 3, (2, 5, 4))
    weight = rng.uniform(0.5, 3, (2, 5, 4)).astype(dtype) if weighted else None
    loss, grad = device("softmax_cross_entropy", logits, target, weight)
    expected_loss, expected_grad = losses.softmax_cross_entropy(logits, target, weight)
    assert loss.shape == () and loss.dtype == np.dtype(dtype)
    assert_close(loss, np.asarray(expected_loss), dtype)
    assert_close(grad, expected_grad, dtype)
    # and PyTorch, independently: the weighted mean of the per-pixel cross-entropy
    per_pixel = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.astype(np.float64)), torch.from_numpy(target), reduction="none"
    ).numpy()
    torch_loss = (per_pixel * (1 if weight is None else weight)).mean()
    np.testing.assert_allclose(loss, torch_loss, rtol=1e-5 if dtype == "float32" else 1e-12)


def test_labels_on_the_gpu_are_not_read_by_the_host(on_emulator, monkeypatch):
    """Reading GPU labels would wait for the GPU at every training step: the host leaves them
    alone, and the kernel gives a label outside [0, K) a NaN loss instead of reading outside
    the logits."""
    monkeypatch.setattr(ops, "is_cupy_array", lambda array: True)  # as if on the GPU
    logits, target = np.zeros((1, 2, 1, 3)), np.array([[[1, 2, -1]]])
    loss, grad = ops.softmax_cross_entropy(logits, target)
    assert np.isnan(loss)
    assert grad[0, :, 0, 0] == pytest.approx([1 / 6, -1 / 6])  # the good pixel
    assert np.isnan(grad[..., 1:]).all()


def test_elementwise_ops_reject_bad_arguments(device, rng):
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        device("relu", x.astype(np.int32))
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        device("relu_backward", x[:1], x)
    with pytest.raises(ValueError, match="at least 2 axes"):
        device("channel_sum", x[0, 0])
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 3\)"):
        device("softmax_cross_entropy", x[:, :, :, None], np.full((2, 4, 1), 3))


# --- Optimisers -----------------------------------------------------------------------------


def _torch_trajectory(make_optimizer, param, grads):
    """The parameter after each step of a torch optimizer fed ``grads``."""
    p = torch.nn.Parameter(torch.from_numpy(param.copy()))
    optimizer = make_optimizer([p])
    trajectory = []
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        optimizer.step()
        trajectory.append(p.detach().numpy().copy())
    return trajectory


@pytest.mark.parametrize("shape", [(7, 5), (300,)])
def test_sgd_momentum_update_matches_torch(device, shape, rng):
    param = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) for _ in range(4)]
    expected = _torch_trajectory(
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), param, grads)
    p, velocity = device.put(param.copy()), device.put(np.zeros(shape))
    for g, wanted in zip(grads, expected, strict=True):
        ops.sgd_momentum_update(p, device.put(g), velocity, 0.1, 0.9, 0.01)
        assert_close(to_numpy(p), wanted, "float64")


@pytest.mark.parametrize("shape", [(7, 5), (300,)])
def test_adam_update_matches_torch(device, shape, rng):
    param = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) for _ in range(4)]
    expected = _torch_trajectory(
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        param, grads)
    p = device.put(param.copy())
    m, v = device.put(np.zeros(shape)), device.put(np.zeros(shape))
    for step, (g, wanted) in enumerate(zip(grads, expected, strict=True), start=1):
        ops.adam_update(p, device.put(g), m, v, step, 0.01, 0.8, 0.95, 1e-6, 0.1)
        assert_close(to_numpy(p), wanted, "float64")


def test_in_place_updates_refuse_mismatched_state(device, rng):
    param = device.put(rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match="velocity must have the shape"):
        ops.sgd_momentum_update(param, param, device.put(np.zeros((3, 4))), 0.1, 0.9)
    with pytest.raises(ValueError, match="step counts from 1"):
        ops.adam_update(param, param, param, param, 0, 0.1)


# --- A whole network -----------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_a_whole_training_step_runs_on_the_kernels(emulated_runner, monkeypatch, optimizer,
                                                   rng):
    """A U-Net training step as minunet runs it on the GPU, with the CUDA kernels emulated:
    convolutions, up-convolutions, ReLU, max-pooling, the loss and the optimiser update all
    launch kernels, and the loss and the updated weights are NumPy's."""
    from minunet import UNet, losses, optim
    from minunet.functional import _dispatch

    x = rng.standard_normal((2, 1, 20, 20))
    target = rng.integers(0, 2, (2, 4, 4))
    weight = rng.uniform(0.5, 2.0, target.shape)

    def train_one_step():
        net = UNet(depth=2, base_channels=4, dtype="float64", seed=5)
        step = getattr(optim, optimizer)(net.parameters(), lr=0.1, weight_decay=0.01)
        net.zero_grad()
        loss, grad = losses.softmax_cross_entropy(net.forward(x), target, weight)
        grad_x = net.backward(grad)
        step.step()
        return float(loss), grad_x, [p.data.copy() for p in net.parameters()]

    expected = train_one_step()
    # Every array now counts as a GPU array, and the GPU is the emulator.
    monkeypatch.setattr(ops, "gpu_runner", lambda: emulated_runner)
    monkeypatch.setattr(_dispatch, "get_array_module", lambda *arrays: "a GPU array module")
    monkeypatch.setattr(optim, "is_cupy_array", lambda array: True)
    before = dict(emulated_runner.launched)
    loss, grad_x, params = train_one_step()
    launched = {name for name, count in emulated_runner.launched.items()
                if count > before.get(name, 0)}
    update = "sgd_momentum_update" if optimizer == "SGD" else "adam_update"
    assert {"relu_forward", "relu_backward", "max_pool2d_forward", "max_pool2d_backward",
            "softmax_cross_entropy", update, "up_conv2x2_forward_pipelined",
            "conv2d_forward_pipelined", "conv2d_weight_grad_pipelined"} <= launched
    assert loss == pytest.approx(expected[0], rel=1e-12)
    assert_close(grad_x, expected[1], "float64")
    for mine, oracle in zip(params, expected[2], strict=True):
        assert_close(mine, oracle, "float64")


# --- The whole API --------------------------------------------------------------------------


def test_every_kernel_is_launched_by_the_ops(on_emulator, rng):
    """Each kernel of each file is reached from :mod:`minunet.cuda.ops` (their correctness
    is the business of the tests above)."""
    device = Device(on_emulator.contiguous)
    before = dict(on_emulator.launched)
    x, w = rng.standard_normal((1, 2, 9, 9)), rng.standard_normal((2, 2, 2, 2))
    for algorithm in ALGORITHMS:  # 64 pixels: two depth slices for the weight gradient
        y = device("conv2d", x, w, algorithm=algorithm)
        device("conv2d_backward", y, x, w, algorithm=algorithm)
        y = device("conv_transpose2d", x, w, stride=2, algorithm=algorithm)
        device("conv_transpose2d_backward", y, x, w, stride=2, algorithm=algorithm)
    y = device("max_pool2d", x, 2)
    device("max_pool2d_backward", y, x, 2)
    device("relu_backward", x, device("relu", x))
    device("softmax_cross_entropy", x, rng.integers(0, 2, (1, 9, 9)))
    p, g, m, v = (device.put(np.zeros(3)) for _ in range(4))
    ops.sgd_momentum_update(p, g, m, 0.1, 0.9)
    ops.adam_update(p, g, m, v, 1, 0.1)
    missed = [name for file in cuda.KERNEL_FILES for name in cuda.kernel_names(file)
              if on_emulator.launched.get(name, 0) == before.get(name, 0)]
    assert not missed


@pytest.mark.parametrize("name", ["conv2d", "conv2d_backward", "conv_transpose2d",
                                  "conv_transpose2d_backward", "max_pool2d",
                                  "max_pool2d_backward"])
def test_ops_take_the_arguments_of_the_numpy_kernels(name):
    """minunet.functional forwards CuPy calls with the caller's arguments unchanged: the
    same positional arguments, and every keyword-only one of the NumPy kernel (the ops may
    have more, such as ``algorithm``)."""
    def arguments(function, keyword_only):
        return [(p.name, p.default) for p in inspect.signature(function).parameters.values()
                if (p.kind is inspect.Parameter.KEYWORD_ONLY) == keyword_only]

    gpu, cpu = getattr(ops, name), inspect.unwrap(getattr(F, name))
    assert arguments(gpu, False) == arguments(cpu, False)
    assert set(arguments(cpu, True)) <= set(arguments(gpu, True))


@pytest.mark.skipif(gpu_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_the_ops_say_what_is_missing(rng):
    with pytest.raises(RuntimeError, match="CuPy|GPU"):
        ops.relu(rng.standard_normal(3))
