"""The ReLU and its gradient against PyTorch's, special values included, also with the
passes shared out to threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minunet.functional import relu_backward, threads


@pytest.fixture(autouse=True, params=[1, 3], ids=["one thread", "three shares"])
def shares(request, monkeypatch):
    """Every test once as is and once with the passes shared out to three threads, runs of
    a few elements each."""
    monkeypatch.setattr(threads, "blas_threads", lambda: request.param)
    monkeypatch.setattr(threads, "ELEMENTWISE_MIN_SIZE", 1)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_matches_torch_with_special_values(dtype):
    """relu_backward (the gradient's bits times 0 or 1) against PyTorch's ReLU gradient,
    with zeros, -0.0, NaN and infinities in the input and in the upstream gradient."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 9, 7)).astype(dtype)
    grad_out = rng.standard_normal(x.shape).astype(dtype)
    x.flat[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30]
    grad_out.flat[6:12] = [np.nan, np.inf, -np.inf, np.nan, 0.0, -0.0]
    grad_out.flat[:6] = np.nan  # where x is not positive, PyTorch passes 0, even for NaN
    x_t = torch.tensor(x, requires_grad=True)
    torch.relu(x_t).backward(torch.tensor(grad_out))
    actual = relu_backward(grad_out, x)
    assert actual.dtype == dtype
    np.testing.assert_array_equal(actual, x_t.grad.numpy())
    assert np.array_equal(np.signbit(actual), np.signbit(x_t.grad.numpy()))


def test_relu_in_place_matches_torch_and_checks_out():
    from minunet.functional import relu

    x = np.random.default_rng(6).standard_normal((2, 3, 4, 5)).astype(np.float32)
    x.flat[:3] = [np.nan, -0.0, np.inf]
    expected = torch.relu(torch.tensor(x)).numpy()
    fresh = relu(x)
    assert fresh is not x
    np.testing.assert_array_equal(fresh, expected)
    assert relu(x, out=x) is x
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(ValueError, match="out must have x's shape"):
        relu(x, out=np.empty((2, 3), np.float32))


def test_relu_backward_writes_into_out_even_over_its_gradient():
    """``out`` receives PyTorch's gradient, special values included, also when it is
    ``grad_out`` itself; an ``out`` of another shape or dtype is one clear error."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    x.flat[:4] = [0.0, np.nan, -np.inf, 2.0]
    grad_out.flat[:4] = [np.inf, np.nan, np.nan, -0.0]
    x_t = torch.tensor(x, requires_grad=True)
    torch.relu(x_t).backward(torch.tensor(grad_out))
    out = np.full_like(grad_out, 7.0)
    assert relu_backward(grad_out, x, out=out) is out
    np.testing.assert_array_equal(out, x_t.grad.numpy())
    assert relu_backward(grad_out, x, out=grad_out) is grad_out
    np.testing.assert_array_equal(grad_out, x_t.grad.numpy())
    assert np.array_equal(np.signbit(grad_out), np.signbit(x_t.grad.numpy()))
    for wrong in (np.empty((2, 3), np.float32), np.empty(x.shape, np.float64)):
        with pytest.raises(ValueError, match="out must have grad_out's shape"):
            relu_backward(grad_out, x, out=wrong)
