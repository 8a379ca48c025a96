"""One test body for both array libraries: the public kernels on NumPy arrays, and (on a
machine with an NVIDIA GPU) on CuPy arrays, which they forward to ``minunet.cuda.ops``.
Results are compared with the NumPy loop references."""

from __future__ import annotations

import numpy as np
import pytest

import minunet.functional as mf
from minunet.backend import to_device, to_numpy
from minunet.cuda import ops


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def device(request):
    return request.param


def run_on(device, function, *args, **kwargs):
    """Call ``function`` with the array arguments moved to ``device``; results to NumPy."""
    moved = [to_device(a, device) if isinstance(a, np.ndarray) else a for a in args]
    result = function(*moved, **kwargs)
    if isinstance(result, tuple):
        return tuple(to_numpy(r) for r in result)
    return to_numpy(result)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_forward_and_backward(device, dtype, rng):
    x, weight, bias = (rng.standard_normal(s).astype(dtype)
                       for s in ((2, 3, 9, 8), (4, 3, 3, 2), (4,)))
    kwargs = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}
    out = run_on(device, mf.conv2d, x, weight, bias, **kwargs)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(out, mf.conv2d_reference(x, weight, bias, **kwargs),
                               rtol=rtol, atol=rtol)
    for ours, reference in zip(
        run_on(device, mf.conv2d_backward, grad_out, x, weight, **kwargs),
        mf.conv2d_backward_reference(grad_out, x, weight, **kwargs),
        strict=True,
    ):
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_transpose2d_forward_and_backward(device, dtype, rng):
    x, weight, bias = (rng.standard_normal(s).astype(dtype)
                       for s in ((2, 4, 5, 4), (4, 3, 2, 2), (3,)))
    out = run_on(device, mf.conv_transpose2d, x, weight, bias, stride=2)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(out, mf.conv_transpose2d_reference(x, weight, bias, stride=2),
                               rtol=rtol, atol=rtol)
    for ours, reference in zip(
        run_on(device, mf.conv_transpose2d_backward, grad_out, x, weight, stride=2),
        mf.conv_transpose2d_backward_reference(grad_out, x, weight, stride=2),
        strict=True,
    ):
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol)


def test_max_pool2d_forward_and_backward_with_ties(device, rng):
    x = rng.integers(0, 3, (2, 3, 8, 6)).astype(np.float32)  # many ties
    out = run_on(device, mf.max_pool2d, x, 2)
    np.testing.assert_array_equal(out, mf.max_pool2d_reference(x, 2))
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    np.testing.assert_array_equal(run_on(device, mf.max_pool2d_backward, grad_out, x, 2),
                                  mf.max_pool2d_backward_reference(grad_out, x, 2))


class FakeCupyArray:
    """Stands in for a CuPy array: minunet recognises CuPy arrays by their type's module."""

    __module__ = "cupy._core.core"
    shape = (1, 1, 4, 4)


def fake_cuda_ops(monkeypatch, name, result):
    """Replace ``minunet.cuda.ops.<name>`` with a stand-in that records its calls."""
    calls = []
    monkeypatch.setattr(ops, name, lambda *args, **kwargs: calls.append((args, kwargs)) or result)
    return calls


# the NumPy-only helpers, and convolve2d/correlate2d which reach the GPU through conv2d
NOT_DISPATCHED = ("im2col", "col2im", "convolve2d", "correlate2d")
DISPATCHED = [n for n in mf.__all__ if not n.endswith("_reference") and n not in NOT_DISPATCHED]


@pytest.mark.parametrize("name", DISPATCHED)
def test_public_kernels_forward_cupy_arrays_to_cuda_ops(name, monkeypatch):
    """Without touching a GPU: a fake CuPy array must reach minunet.cuda.ops.<same name>,
    with the arguments unchanged."""
    calls = fake_cuda_ops(monkeypatch, name, "gpu")
    x = FakeCupyArray()
    assert getattr(mf, name)(x, x, x, stride=2) == "gpu"
    assert calls == [((x, x, x), {"stride": 2})]


class FakeCupyImage(FakeCupyArray):
    """A 2-D stand-in that survives the indexing convolve2d/correlate2d do before conv2d."""

    __module__ = FakeCupyArray.__module__
    shape, ndim, dtype = (4, 5), 2, np.dtype(np.float64)

    def __getitem__(self, index):
        return self


@pytest.mark.parametrize("name", ["convolve2d", "correlate2d"])
def test_signal_functions_reach_the_gpu_through_conv2d(name, monkeypatch):
    calls = fake_cuda_ops(monkeypatch, "conv2d", np.zeros((1, 1, 6, 7)))
    image = FakeCupyImage()
    assert getattr(mf, name)(image, image, mode="same").shape == (4, 5)
    assert calls == [((image, image), {"padding": "full"})]


def test_mixing_numpy_and_cupy_arrays_is_refused():
    with pytest.raises(TypeError, match="NumPy arrays or all CuPy arrays"):
        mf.conv2d(np.zeros((1, 1, 4, 4)), FakeCupyArray())
