"""Every backward kernel against central differences, in float64.

For a forward map ``y = f(x, w, b)`` and a random upstream gradient ``g``, the backward kernel
claims to return the gradient of the scalar ``L = <f(x, w, b), g>``. We perturb one entry at
a time by ``±eps`` and compare ``(L(+eps) - L(-eps)) / (2 eps)`` with the claim, reporting the
relative error ``|numerical - analytic| / max(|numerical|, |analytic|)`` (norms over all
entries). Convolutions are linear in each argument, so central differences are exact up to
rounding; max-pooling is piecewise linear and is probed away from ties.
"""

from __future__ import annotations

import numpy as np
import pytest

import minunet.functional as mf

EPS = 1e-6
MAX_RELATIVE_ERROR = 1e-7


def numerical_gradient(loss, array):
    """Central differences of ``loss()`` with respect to every entry of ``array``.

    ``array`` is perturbed in place and restored; ``loss`` must read it afresh each call.
    """
    grad = np.zeros_like(array)
    flat = array.reshape(-1)
    for k in range(flat.size):
        original = flat[k]
        flat[k] = original + EPS
        plus = loss()
        flat[k] = original - EPS
        minus = loss()
        flat[k] = original
        grad.flat[k] = (plus - minus) / (2 * EPS)
    return grad


def relative_error(numerical, analytic):
    scale = max(np.linalg.norm(numerical), np.linalg.norm(analytic), 1e-300)
    return np.linalg.norm(numerical - analytic) / scale


def assert_gradients(forward, analytic, arrays, grad_out):
    """Compare each analytic gradient with central differences of <forward(), grad_out>."""
    for name, array in arrays.items():
        numerical = numerical_gradient(lambda: np.vdot(forward(), grad_out), array)
        error = relative_error(numerical, analytic[name])
        assert error < MAX_RELATIVE_ERROR, f"grad of {name}: relative error {error:.2e}"


CONV_CASES = [
    {"stride": 1, "padding": 0, "dilation": 1},
    {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)},
    {"stride": 1, "padding": "same", "dilation": (2, 1)},
]
TRANSPOSE_CASES = [
    {"stride": 2, "padding": 0, "output_padding": 0, "dilation": 1},
    {"stride": (2, 3), "padding": (1, 0), "output_padding": (1, 2), "dilation": (2, 1)},
]


@pytest.mark.parametrize("kwargs", CONV_CASES)
@pytest.mark.parametrize(
    ("forward", "backward"),
    [(mf.conv2d, mf.conv2d_backward), (mf.conv2d_reference, mf.conv2d_backward_reference)],
    ids=["fast", "reference"],
)
def test_conv2d_backward(forward, backward, kwargs, rng):
    x, weight, bias = (rng.standard_normal(s) for s in ((2, 2, 6, 5), (3, 2, 2, 3), (3,)))
    grad_out = rng.standard_normal(forward(x, weight, bias, **kwargs).shape)
    grads = dict(zip(("x", "weight", "bias"), backward(grad_out, x, weight, **kwargs),
                     strict=True))
    assert_gradients(lambda: forward(x, weight, bias, **kwargs), grads,
                     {"x": x, "weight": weight, "bias": bias}, grad_out)


@pytest.mark.parametrize("kwargs", TRANSPOSE_CASES)
@pytest.mark.parametrize(
    ("forward", "backward"),
    [
        (mf.conv_transpose2d, mf.conv_transpose2d_backward),
        (mf.conv_transpose2d_reference, mf.conv_transpose2d_backward_reference),
    ],
    ids=["fast", "reference"],
)
def test_conv_transpose2d_backward(forward, backward, kwargs, rng):
    x, weight, bias = (rng.standard_normal(s) for s in ((2, 2, 4, 3), (2, 3, 3, 2), (3,)))
    grad_out = rng.standard_normal(forward(x, weight, bias, **kwargs).shape)
    grads = dict(zip(("x", "weight", "bias"), backward(grad_out, x, weight, **kwargs),
                     strict=True))
    assert_gradients(lambda: forward(x, weight, bias, **kwargs), grads,
                     {"x": x, "weight": weight, "bias": bias}, grad_out)


def distinct_values(rng, shape):
    """Entries at least 1e-2 apart, so that no ±eps step changes which pixel is a maximum."""
    return rng.permutation(np.prod(shape)).reshape(shape) * 1e-2 + rng.uniform(0, 1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [{"kernel_size": 2}, {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 1)}],
)
@pytest.mark.parametrize("kind", ["fast", "indices", "reference"])
def test_max_pool2d_backward(kind, kwargs, rng):
    x = distinct_values(rng, (2, 2, 6, 5))
    forward = mf.max_pool2d_reference if kind == "reference" else mf.max_pool2d
    out, indices = mf.max_pool2d(x, return_indices=True, **kwargs)
    grad_out = rng.standard_normal(out.shape)
    if kind == "reference":
        grad_x = mf.max_pool2d_backward_reference(grad_out, x, **kwargs)
    else:
        saved = indices if kind == "indices" else None
        grad_x = mf.max_pool2d_backward(grad_out, x, indices=saved, **kwargs)
    assert_gradients(lambda: forward(x, **kwargs), {"x": grad_x}, {"x": x}, grad_out)


# --- Larger tensors: one directional derivative along a random unit vector ------------------


@pytest.mark.parametrize(
    ("forward", "backward", "shapes", "kwargs"),
    [
        (mf.conv2d, mf.conv2d_backward, ((2, 8, 20, 20), (16, 8, 3, 3), (16,)), {}),
        (mf.conv_transpose2d, mf.conv_transpose2d_backward,
         ((2, 16, 10, 10), (16, 8, 2, 2), (8,)), {"stride": 2}),
    ],
    ids=["conv3x3", "upconv2x2"],
)
def test_directional_derivative_on_unet_sized_layers(forward, backward, shapes, kwargs, rng):
    arrays = [rng.standard_normal(s) for s in shapes]
    grad_out = rng.standard_normal(forward(*arrays, **kwargs).shape)
    analytic = backward(grad_out, arrays[0], arrays[1], **kwargs)
    directions = [rng.standard_normal(s) for s in shapes]
    norm = np.sqrt(sum(np.vdot(d, d) for d in directions))
    directions = [d / norm for d in directions]

    def loss(step):
        moved = [a + step * d for a, d in zip(arrays, directions, strict=True)]
        return np.vdot(forward(*moved, **kwargs), grad_out)

    numerical = (loss(EPS) - loss(-EPS)) / (2 * EPS)
    claimed = sum(np.vdot(g, d) for g, d in zip(analytic, directions, strict=True))
    error = abs(numerical - claimed) / max(abs(numerical), abs(claimed))
    assert error < MAX_RELATIVE_ERROR, f"directional derivative: relative error {error:.2e}"
