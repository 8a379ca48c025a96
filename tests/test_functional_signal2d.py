"""convolve2d and correlate2d (fast and reference) against scipy.signal."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

import minunet.functional as mf

SHAPES = [  # (image, kernel): odd and even kernels, non-square, kernel larger than image
    ((7, 9), (3, 3)),
    ((7, 9), (2, 2)),
    ((8, 6), (4, 3)),
    ((6, 8), (2, 5)),
    ((5, 5), (1, 1)),
    ((5, 4), (5, 4)),
    ((3, 4), (5, 6)),
    ((3, 4), (6, 5)),
]

PAIRS = [
    (mf.convolve2d, mf.convolve2d_reference, signal.convolve2d),
    (mf.correlate2d, mf.correlate2d_reference, signal.correlate2d),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", ["full", "same", "valid"])
@pytest.mark.parametrize(("image_shape", "kernel_shape"), SHAPES)
@pytest.mark.parametrize(("fast", "reference", "scipy_op"), PAIRS, ids=["convolve", "correlate"])
def test_matches_scipy(fast, reference, scipy_op, image_shape, kernel_shape, mode, dtype, rng):
    image = rng.standard_normal(image_shape).astype(dtype)
    kernel = rng.standard_normal(kernel_shape).astype(dtype)
    expected = scipy_op(image, kernel, mode)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for ours in (fast(image, kernel, mode), reference(image, kernel, mode)):
        assert ours.dtype == dtype
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize(("fast", "reference", "scipy_op"), PAIRS, ids=["convolve", "correlate"])
def test_same_mode_centring_of_even_kernels(fast, reference, scipy_op):
    """An impulse shows where 'same' puts the kernel: SciPy centres convolution and
    correlation differently for even kernels, and so must we."""
    image = np.zeros((6, 6))
    image[3, 3] = 1.0
    kernel = np.arange(1.0, 17.0).reshape(4, 4)
    expected = scipy_op(image, kernel, "same")
    np.testing.assert_array_equal(fast(image, kernel, "same"), expected)
    np.testing.assert_array_equal(reference(image, kernel, "same"), expected)


def test_convolution_flips_the_kernel(rng):
    image, kernel = rng.standard_normal((6, 7)), rng.standard_normal((3, 2))
    np.testing.assert_allclose(
        mf.convolve2d(image, kernel, "valid"), mf.correlate2d(image, kernel[::-1, ::-1], "valid")
    )
