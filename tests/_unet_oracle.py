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
# through linear maps only adds a constant per channel that the normalisation subtracts
# again: its gradient is zero up to rounding, and its value after training is rounding noise.
# That holds for the 3x3 convs' biases, and for the up-convolutions' biases (through the
# concatenation and the next conv) when that conv is valid: zero padding would make the
# constant vary near the borders.
_INERT_CONV_BIAS = re.compile(r"^(encoder|decoder)\.\d+\.conv[12]\.bias$")
_INERT_UPCONV_BIAS = re.compile(r"^upconv\.\d+\.bias$")


def is_inert(net, name: str) -> bool:
    """Whether the parameter ``name`` of ``net`` is a bias its BatchNorms cancel (above)."""
    if not (net.config["batch_norm"] and net.training):
        return False
    return bool(_INERT_CONV_BIAS.match(name) or (net.config["padding"] == "valid"
                                                 and _INERT_UPCONV_BIAS.match(name)))


def scale_of(net, name: str, tensors: dict) -> float:
    """The size ``tensors[name]`` is measured by: its own largest value, or for an inert
    bias (whose values are rounding noise) the largest value of its layer's weight."""
    if is_inert(net, name):
        name = name.replace(".bias", ".weight")
    return float(np.abs(tensors[name]).max())


def assert_gradients_match(net, torch_net, rtol):
    """Every parameter gradient of ``net`` equals the torch twin's ``.grad``, each tensor
    measured by its own size (:func:`scale_of`): a layer with small gradients gets no slack
    from a layer with large ones."""
    torch_grads = {name: p.grad.numpy() for name, p in torch_net.named_parameters()}
    ours = {name: to_numpy(p.grad) for name, p in net.named_parameters()}
    assert set(torch_grads) == set(ours)
    for name, grad in ours.items():
        assert_close_to(grad, torch_grads[name], rtol, scale_of(net, name, torch_grads),
                        what=f"grad of {name}")
