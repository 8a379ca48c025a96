"""Shared by the U-Net tests: build a minunet U-Net and its PyTorch twin with equal weights,
and compare arrays with a tolerance scaled to the whole network's gradients."""

from __future__ import annotations

import numpy as np
import torch

from minunet import UNet
from minunet.backend import to_numpy
from minunet.serialization import to_torch_state_dict
from minunet.torch_reference import TorchUNet

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def twin_networks(**config):
    """A :class:`minunet.UNet` built from ``config`` and a TorchUNet holding its weights."""
    net = UNet(**config)
    torch_net = TorchUNet(**{k: v for k, v in config.items() if k not in ("dtype", "seed")})
    torch_net = torch_net.to(TORCH_DTYPES[net.dtype.name])
    torch_net.load_state_dict(to_torch_state_dict(net))
    return net, torch_net


def assert_close_to(actual, expected, rtol, scale=None, what=""):
    """``|actual - expected| <= rtol * (|expected| + scale)`` element-wise.

    ``scale`` (default: max |expected|) keeps entries that are zero up to rounding from
    failing a purely relative test, e.g. the gradient of a bias that a BatchNorm cancels.
    """
    actual, expected = to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max() if scale is None else scale
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_gradients_match(net, torch_net, rtol):
    """Every parameter gradient of ``net`` equals the torch twin's ``.grad``; the tolerance
    is scaled by the largest gradient of the network."""
    torch_grads = {name: p.grad.numpy() for name, p in torch_net.named_parameters()}
    assert set(torch_grads) == {name for name, _ in net.named_parameters()}
    scale = max(np.abs(g).max() for g in torch_grads.values())
    for name, p in net.named_parameters():
        assert_close_to(p.grad, torch_grads[name], rtol, scale, what=f"grad of {name}")
