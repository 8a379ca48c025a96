"""max_pool2d (fast and reference) against PyTorch, including the tie rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minunet.functional as mf
from minunet.functional import threads


def random_pool_case(seed, *, small, integer_valued):
    """A max-pool configuration PyTorch accepts; integer values make ties frequent."""
    rng = np.random.default_rng(seed)
    kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
    stride = None if rng.integers(3) == 0 else tuple(int(s) for s in rng.integers(1, 4, 2))
    padding = tuple(int(rng.integers(0, k // 2 + 1)) for k in kernel)
    size = tuple(int(k + rng.integers(0, 5 if small else 12)) for k in kernel)
    shape = (int(rng.integers(1, 3)), int(rng.integers(1, 4)), *size)
    x = rng.integers(-2, 3, shape).astype(float) if integer_valued else rng.standard_normal(shape)
    return x, {"kernel_size": kernel, "stride": stride, "padding": padding}


def torch_pool(x, grad_seed, kwargs):
    """Output, indices, upstream gradient and input gradient from PyTorch, in float64."""
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch_kwargs = {k: v for k, v in kwargs.items() if v is not None}
    out, indices = F.max_pool2d(tx, return_indices=True, **torch_kwargs)
    grad_out = np.random.default_rng(grad_seed).standard_normal(tuple(out.shape))
    out.backward(torch.tensor(grad_out))
    return out.detach().numpy(), indices.numpy(), grad_out, tx.grad.numpy()


@pytest.mark.parametrize("shares", [1, 3], ids=["one thread", "three shares"])
@pytest.mark.parametrize("integer_valued", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(25))
def test_fast_max_pool_matches_torch(seed, dtype, integer_valued, shares, monkeypatch):
    monkeypatch.setattr(threads, "blas_threads", lambda: shares)  # channels shared out
    monkeypatch.setattr(threads, "ELEMENTWISE_MIN_SIZE", 1)
    x, kwargs = random_pool_case(seed, small=False, integer_valued=integer_valued)
    out, indices, grad_out, grad_x = torch_pool(x, seed, kwargs)
    x, grad_out = x.astype(dtype), grad_out.astype(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12}

    ours, our_indices = mf.max_pool2d(x, return_indices=True, **kwargs)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(ours, out.astype(dtype))
    np.testing.assert_array_equal(our_indices, indices)
    np.testing.assert_array_equal(mf.max_pool2d(x, **kwargs), ours)

    recomputed = mf.max_pool2d_backward(grad_out, x, **kwargs)
    from_indices = mf.max_pool2d_backward(grad_out, x, indices=our_indices, **kwargs)
    for grad in (recomputed, from_indices):
        assert grad.dtype == dtype
        np.testing.assert_allclose(grad, grad_x, **tolerance)


@pytest.mark.parametrize("integer_valued", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", range(100, 112))
def test_reference_max_pool_matches_torch_and_fast(seed, integer_valued):
    x, kwargs = random_pool_case(seed, small=True, integer_valued=integer_valued)
    out, _, grad_out, grad_x = torch_pool(x, seed, kwargs)
    reference = mf.max_pool2d_reference(x, **kwargs)
    np.testing.assert_array_equal(reference, out)
    np.testing.assert_array_equal(reference, mf.max_pool2d(x, **kwargs))
    grad_reference = mf.max_pool2d_backward_reference(grad_out, x, **kwargs)
    np.testing.assert_allclose(grad_reference, grad_x, rtol=1e-12)
    np.testing.assert_allclose(grad_reference, mf.max_pool2d_backward(grad_out, x, **kwargs),
                               rtol=1e-12)


# --- The tie rule, spelled out --------------------------------------------------------------


def backward_from_saved_indices(grad_out, x, kernel_size):
    _, indices = mf.max_pool2d(x, kernel_size, return_indices=True)
    return mf.max_pool2d_backward(grad_out, x, kernel_size, indices=indices)


@pytest.mark.parametrize(
    "backward",
    [mf.max_pool2d_backward, mf.max_pool2d_backward_reference, backward_from_saved_indices],
    ids=["fast", "reference", "indices"],
)
def test_first_maximum_in_row_major_order_takes_the_gradient(backward):
    # Four 2x2 windows: constant, a tie on the second row, a tie across rows, a unique max.
    x = np.array(
        [[[[5.0, 5.0, 0.0, 1.0],
           [5.0, 5.0, 3.0, 3.0],
           [1.0, 7.0, 0.0, 0.0],
           [7.0, 2.0, 4.0, 0.0]]]]
    )
    grad_out = np.array([[[[10.0, 20.0], [30.0, 40.0]]]])
    expected = np.array(
        [[[[10.0, 0.0, 0.0, 0.0],
           [0.0, 0.0, 20.0, 0.0],
           [0.0, 30.0, 0.0, 0.0],
           [0.0, 0.0, 40.0, 0.0]]]]
    )
    np.testing.assert_array_equal(backward(grad_out, x, 2), expected)


def test_overlapping_windows_accumulate_on_a_shared_maximum():
    """With stride 1, a pixel that wins several windows receives all of their gradients."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = 1.0  # the maximum of every 3x3 window that contains it
    grad_out = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    _, indices = mf.max_pool2d(x, 3, 1, return_indices=True)
    for grad in (
        mf.max_pool2d_backward(grad_out, x, 3, 1),
        mf.max_pool2d_backward(grad_out, x, 3, 1, indices=indices),
        mf.max_pool2d_backward_reference(grad_out, x, 3, 1),
    ):
        assert grad[0, 0, 1, 1] == grad_out.sum()
        assert np.count_nonzero(grad) == 1


def test_padding_never_wins():
    """-inf padding: an all-negative border pixel still beats the padding."""
    x = -np.ones((1, 1, 3, 3))
    out = mf.max_pool2d(x, 3, 1, padding=1)
    np.testing.assert_array_equal(out, -np.ones((1, 1, 3, 3)))
    np.testing.assert_array_equal(mf.max_pool2d_reference(x, 3, 1, padding=1), out)


def test_inputs_are_not_modified(rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    x_copy = x.copy()
    out, indices = mf.max_pool2d(x, 2, return_indices=True)
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    grad_copy, indices_copy = grad_out.copy(), indices.copy()
    mf.max_pool2d_backward(grad_out, x, 2)
    mf.max_pool2d_backward(grad_out, x, 2, indices=indices)
    mf.max_pool2d_backward_reference(grad_out, x, 2)
    for before, after in ((x_copy, x), (grad_copy, grad_out), (indices_copy, indices)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("window", [[1.0, np.nan, 3.0, 0.5], [np.nan, 1.0, np.nan, 5.0],
                                    [5.0, 1.0, 2.0, np.nan]], ids=["one", "two", "last"])
def test_a_nan_in_a_window_routes_the_gradient_as_torch_does(window, rng):
    """PyTorch's running maximum is replaced by every NaN it meets: the output is NaN and the
    last NaN in row-major window order takes the gradient."""
    x = rng.standard_normal((1, 2, 4, 6))
    x[0, 1, 2:4, 2:4] = np.reshape(window, (2, 2))
    grad_out = rng.standard_normal((1, 2, 2, 3))
    x_t = torch.from_numpy(x).requires_grad_(True)
    out_t, indices_t = F.max_pool2d(x_t, 2, return_indices=True)
    out_t.backward(torch.from_numpy(grad_out))
    out, indices = mf.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(out, out_t.detach().numpy())  # NaN where torch has NaN
    np.testing.assert_array_equal(mf.max_pool2d_reference(x, 2), out)
    np.testing.assert_array_equal(indices, indices_t.numpy())
    for grad in (mf.max_pool2d_backward(grad_out, x, 2),
                 mf.max_pool2d_backward(grad_out, x, 2, indices=indices),
                 mf.max_pool2d_backward_reference(grad_out, x, 2)):
        np.testing.assert_array_equal(grad, x_t.grad.numpy())
