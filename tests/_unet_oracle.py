"""Shared by the U-Net tests: build a minunet U-Net and its PyTorch twin with equal weights,
and compare arrays, each with a tolerance scaled to its own size."""

from __future__ import annotations

import re

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

    ``scale`` (default: max |expected|, the tensor's own size) keeps entries that are zero up
    to rounding from failing a purely relative test.
    """
    actual, expected = to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max() if scale is None else scale
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


# With BatchNorm in training mode (batch statistics), a bias that reaches a BatchNorm
# through linear maps only (the 3x3 convs' biases, and the up-convolutions' through the
# concatenation and the next conv) adds a constant per channel that the normalisation
# subtracts again: its gradient is zero up to rounding.
_INERT_BIAS = re.compile(r"^((encoder|decoder)\.\d+\.conv[12]|upconv\.\d+)\.bias$")


def assert_gradients_match(net, torch_net, rtol):
    """Every parameter gradient of ``net`` equals the torch twin's ``.grad``, each tensor
    measured by its own size (a layer with small gradients gets no slack from a layer with
    large ones). The biases that a BatchNorm in training mode makes inert must be zero up to
    rounding on both sides, compared with the gradient of their own layer's weight."""
    torch_grads = {name: p.grad.numpy() for name, p in torch_net.named_parameters()}
    ours = {name: to_numpy(p.grad) for name, p in net.named_parameters()}
    assert set(torch_grads) == set(ours)
    for name, grad in ours.items():
        if net.config["batch_norm"] and net.training and _INERT_BIAS.match(name):
            weight_scale = np.abs(torch_grads[name.replace(".bias", ".weight")]).max()
            for side, values in (("minunet", grad), ("torch", torch_grads[name])):
                assert np.abs(values).max() <= rtol * weight_scale, f"{side} grad of {name}"
        else:
            assert_close_to(grad, torch_grads[name], rtol, what=f"grad of {name}")
