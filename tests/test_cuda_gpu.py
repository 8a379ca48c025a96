"""The GPU backend end to end, on CuPy arrays (every test needs a GPU; skipped elsewhere).

* the public kernels of :mod:`minunet.functional`, given CuPy arrays, run the CUDA kernels
  and agree with the NumPy kernels and with PyTorch on the GPU (cuDNN, TF32 off);
* a U-Net's forward and backward pass on CuPy agree with NumPy and with PyTorch on the GPU;
* a short training run on CuPy (loss and optimiser on the CUDA kernels too) follows the loss
  curve of the same run in NumPy.

Kernel-by-kernel checks on CuPy are in ``test_cuda_kernels.py`` (its ``cupy`` variants).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minunet import functional as F
from minunet.backend import is_cupy_array, to_device, to_numpy
from minunet.cuda import ops

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def torch_cuda():
    """The CUDA device of PyTorch, with TF32 off so that float32 means float32."""
    if not torch.cuda.is_available():
        pytest.skip("PyTorch was built without CUDA here")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


TOLERANCE = {"float64": 1e-10, "float32": 2e-4}


def assert_close(actual, expected, dtype, scale=None):
    """Agreement relative to ``scale``, by default the largest entry of ``expected`` (a sum
    of many products rounds relative to its largest terms)."""
    actual, expected = to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == np.dtype(dtype)
    scale = max(float(np.abs(expected).max()), 1e-30) if scale is None else scale
    assert float(np.abs(actual - expected).max()) <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_functional_on_cupy_matches_numpy_and_torch_cuda(dtype, torch_cuda, rng):
    x = rng.standard_normal((2, 6, 23, 19)).astype(dtype)
    w = rng.standard_normal((20, 6, 3, 2)).astype(dtype)
    wt = rng.standard_normal((6, 5, 2, 2)).astype(dtype)
    b = rng.standard_normal(20).astype(dtype)
    gx = to_device(x, "cupy")

    def on_torch(a):
        return torch.from_numpy(a).to(torch_cuda)

    conv_args = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    y = F.conv2d(gx, to_device(w, "cupy"), to_device(b, "cupy"), **conv_args)
    assert type(y).__module__.startswith("cupy")
    assert_close(y, F.conv2d(x, w, b, **conv_args), dtype)
    assert_close(y, torch.nn.functional.conv2d(on_torch(x), on_torch(w), on_torch(b),
                                               **conv_args).cpu().numpy(), dtype)

    g = rng.standard_normal(y.shape).astype(dtype)
    got = F.conv2d_backward(to_device(g, "cupy"), gx, to_device(w, "cupy"), **conv_args)
    tx, tw = on_torch(x).requires_grad_(), on_torch(w).requires_grad_()
    tb = on_torch(b).requires_grad_()
    torch.nn.functional.conv2d(tx, tw, tb, **conv_args).backward(on_torch(g))
    for mine, theirs in zip(got, (tx.grad, tw.grad, tb.grad), strict=True):
        assert_close(mine, theirs.cpu().numpy(), dtype)

    up = F.conv_transpose2d(gx, to_device(wt, "cupy"), stride=2)
    assert_close(up, torch.nn.functional.conv_transpose2d(on_torch(x), on_torch(wt), stride=2)
                 .cpu().numpy(), dtype)
    g = rng.standard_normal(up.shape).astype(dtype)
    got = F.conv_transpose2d_backward(to_device(g, "cupy"), gx, to_device(wt, "cupy"), stride=2)
    tx, tw = on_torch(x).requires_grad_(), on_torch(wt).requires_grad_()
    torch.nn.functional.conv_transpose2d(tx, tw, stride=2).backward(on_torch(g))
    assert_close(got[0], tx.grad.cpu().numpy(), dtype)
    assert_close(got[1], tw.grad.cpu().numpy(), dtype)

    pooled = F.max_pool2d(gx, 2)
    assert_close(pooled, torch.nn.functional.max_pool2d(on_torch(x), 2).cpu().numpy(), dtype)
    g = rng.standard_normal(pooled.shape).astype(dtype)
    tx = on_torch(x).requires_grad_()
    torch.nn.functional.max_pool2d(tx, 2).backward(on_torch(g))
    assert_close(F.max_pool2d_backward(to_device(g, "cupy"), gx, 2), tx.grad.cpu().numpy(),
                 dtype)


@pytest.mark.parametrize("algorithm", ops.ALGORITHMS)
def test_every_rung_of_the_ladder_matches_cudnn(algorithm, torch_cuda, rng):
    """float32 against cuDNN (TF32 off): a 3x3 convolution whose sizes fill no tile evenly
    (bias and fused ReLU, both gradients) and a 2x2 stride-2 up-convolution."""
    def on_torch(a):
        return torch.from_numpy(a).to(torch_cuda).requires_grad_()

    x = rng.standard_normal((2, 48, 37, 41)).astype(np.float32)
    w = rng.standard_normal((70, 48, 3, 3)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    gx, gw, gb = (to_device(a, "cupy") for a in (x, w, b))
    tx, tw, tb = on_torch(x), on_torch(w), on_torch(b)
    ty = torch.nn.functional.conv2d(tx, tw, tb)
    assert_close(ops.conv2d(gx, gw, gb, algorithm=algorithm), ty.detach().cpu().numpy(),
                 "float32")
    assert_close(ops.conv2d(gx, gw, gb, algorithm=algorithm, relu=True),
                 torch.relu(ty).detach().cpu().numpy(), "float32")
    g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    ty.backward(torch.from_numpy(g).to(torch_cuda))
    got = ops.conv2d_backward(to_device(g, "cupy"), gx, gw, algorithm=algorithm)
    for mine, theirs in zip(got, (tx.grad, tw.grad, tb.grad), strict=True):
        assert_close(mine, theirs.cpu().numpy(), "float32")

    up_w = rng.standard_normal((48, 35, 2, 2)).astype(np.float32)
    tx, tw = on_torch(x), on_torch(up_w)
    ty = torch.nn.functional.conv_transpose2d(tx, tw, stride=2)
    assert_close(ops.conv_transpose2d(gx, to_device(up_w, "cupy"), stride=2,
                                      algorithm=algorithm), ty.detach().cpu().numpy(), "float32")
    g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    ty.backward(torch.from_numpy(g).to(torch_cuda))
    got = ops.conv_transpose2d_backward(to_device(g, "cupy"), gx, to_device(up_w, "cupy"),
                                        stride=2, algorithm=algorithm)
    assert_close(got[0], tx.grad.cpu().numpy(), "float32")
    assert_close(got[1], tw.grad.cpu().numpy(), "float32")


def _forward_backward(net, x):
    """Logits, input gradient and parameter gradients (NumPy) for a fixed random upstream
    gradient, on whichever device ``x`` lives."""
    net.zero_grad()  # backward accumulates into .grad
    logits = net.forward(x)
    grad_logits = np.random.default_rng(0).standard_normal(logits.shape).astype(logits.dtype)
    grad_x = net.backward(to_device(grad_logits, "cupy" if is_cupy_array(x) else "numpy"))
    grads = {name: np.array(to_numpy(p.grad)) for name, p in net.named_parameters()}
    return np.array(to_numpy(logits)), np.array(to_numpy(grad_x)), grads


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_unet_forward_backward_on_cupy_matches_numpy(padding, rng):
    from minunet import UNet

    net = UNet(in_channels=1, num_classes=2, depth=3, base_channels=8, padding=padding,
               dtype="float64", seed=1)
    size = net.valid_input_size(44)
    x = rng.standard_normal((2, 1, size, size))
    expected = _forward_backward(net, x)
    net.to("cupy")
    got = _forward_backward(net, to_device(x, "cupy"))
    assert_close(got[0], expected[0], "float64")
    assert_close(got[1], expected[1], "float64")
    for name, grad in expected[2].items():
        assert_close(got[2][name], grad, "float64")


def test_unet_on_cupy_matches_torch_cuda(torch_cuda, rng):
    from minunet import UNet
    from minunet.serialization import to_torch_state_dict
    from minunet.torch_reference import TorchUNet

    net = UNet(depth=4, base_channels=16, dtype="float32", seed=2)
    torch_net = TorchUNet(depth=4, base_channels=16)
    torch_net.load_state_dict(to_torch_state_dict(net))
    torch_net.to(torch_cuda)
    net.to("cupy")
    size = net.valid_input_size(100)
    x = rng.standard_normal((2, 1, size, size)).astype(np.float32)
    logits, grad_x, grads = _forward_backward(net, to_device(x, "cupy"))

    tx = torch.from_numpy(x).to(torch_cuda).requires_grad_()
    t_logits = torch_net(tx)
    grad_logits = np.random.default_rng(0).standard_normal(logits.shape).astype(np.float32)
    t_logits.backward(torch.from_numpy(grad_logits).to(torch_cuda))
    assert_close(logits, t_logits.detach().cpu().numpy(), "float32")
    assert_close(grad_x, tx.grad.cpu().numpy(), "float32")
    torch_grads = {name: p.grad.cpu().numpy() for name, p in torch_net.named_parameters()}
    assert set(torch_grads) == set(grads)
    # relative to the network's largest gradient: a bias gradient sums many cancelling terms
    scale = max(float(np.abs(g).max()) for g in torch_grads.values())
    for name, grad in torch_grads.items():
        assert_close(grads[name], grad, "float32", scale)


def _disks(count, size, seed):
    """``count`` noisy images of bright disks (N, 1, size, size) and their masks (N, H, W)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((count, size, size), dtype=np.int64)
    for mask in masks:
        for _ in range(6):
            r0, c0 = rng.uniform(0, size, 2)
            mask[(rows - r0) ** 2 + (cols - c0) ** 2 < rng.uniform(4, 9) ** 2] = 1
    images = 0.6 * masks + 0.2 * rng.standard_normal(masks.shape)
    return images[:, None].astype(np.float32), masks


def _center_crop(labels, size):
    top = (labels.shape[-1] - size) // 2
    return labels[..., top:top + size, top:top + size]


def test_training_on_cupy_follows_the_numpy_loss_curve():
    """Ten SGD steps: NumPy (minunet.losses + minunet.optim) against CuPy with the loss and
    the update on the CUDA kernels (ops.softmax_cross_entropy, ops.sgd_momentum_update)."""
    from minunet import UNet, losses, optim

    config = dict(depth=3, base_channels=8, dtype="float32", seed=3)
    size = UNet(**config).valid_input_size(60)
    x, masks = _disks(2, size, seed=4)
    lr, momentum, steps = 0.01, 0.99, 10

    net = UNet(**config)
    target = _center_crop(masks, net.output_size(size))
    optimizer = optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    numpy_curve = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, grad = losses.softmax_cross_entropy(net.forward(x), target)
        net.backward(grad)
        optimizer.step()
        numpy_curve.append(float(loss))

    gpu_net = UNet(**config).to("cupy")
    gx, gtarget = to_device(x, "cupy"), to_device(target, "cupy")
    velocities = [p.data * 0 for p in gpu_net.parameters()]
    gpu_curve = []
    for _ in range(steps):
        gpu_net.zero_grad()
        loss, grad = ops.softmax_cross_entropy(gpu_net.forward(gx), gtarget)
        gpu_net.backward(grad)
        for parameter, velocity in zip(gpu_net.parameters(), velocities, strict=True):
            ops.sgd_momentum_update(parameter.data, parameter.grad, velocity, lr, momentum)
        gpu_curve.append(float(loss))

    assert numpy_curve[-1] < numpy_curve[0]  # it learns at all
    np.testing.assert_allclose(gpu_curve, numpy_curve, rtol=1e-4)
