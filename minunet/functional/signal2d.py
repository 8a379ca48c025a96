"""Single-channel 2-D convolution and correlation, as in ``scipy.signal``.

For an image ``f`` (H, W) and a kernel ``g`` (kH, kW) the *full* results are

    correlation: (f ⋆ g)[m, l] = sum_{a, b} f[m + a - (kH-1), l + b - (kW-1)] * g[a, b]
    convolution: (f * g)[m, l] = sum_{r, c} f[r, c] * g[m - r, l - c]

both of size (H + kH - 1, W + kW - 1), with ``f`` taken as zero outside the image. A
convolution is a correlation with the kernel flipped in both axes. ``mode`` then keeps a
window of the full result (see :func:`minunet.shapes.signal2d_mode_window`): ``"full"``,
``"same"`` (the size of the image, centred as SciPy centres it) or ``"valid"`` (only
positions where one array covers the other entirely).

What deep-learning libraries call "convolution" (:func:`~minunet.functional.conv2d`) is the
correlation; :func:`correlate2d` is literally a one-channel ``conv2d`` with ``"full"`` padding.
That is also how CuPy arrays are served: they travel through ``conv2d``'s dispatch to the
GPU kernels, and the rest (a slice) works on either array library.
"""

from __future__ import annotations

import numpy as np

from minunet.checks import check_float_array, check_same_dtype
from minunet.functional.conv import conv2d
from minunet.shapes import signal2d_mode_window


def _signal_arguments(image, kernel, mode, *, convolve: bool):
    check_float_array(image, "image", "(H, W)")
    check_float_array(kernel, "kernel", "(kH, kW)")
    check_same_dtype("image", image, kernel=kernel)
    return signal2d_mode_window(image.shape, kernel.shape, mode, convolve=convolve)


def _full_result_shape(image, kernel):
    return tuple(n + k - 1 for n, k in zip(image.shape, kernel.shape, strict=True))


# --- Reference kernels ----------------------------------------------------------------------


def correlate2d_reference(image, kernel, mode="full"):
    """Correlation with loops: each output pixel is the kernel's dot product with the image
    patch under it (zero-padded by ``kH-1``, ``kW-1`` on every side)."""
    window = _signal_arguments(image, kernel, mode, convolve=False)
    kh, kw = kernel.shape
    padded = np.pad(image, ((kh - 1, kh - 1), (kw - 1, kw - 1)))
    full = np.zeros(_full_result_shape(image, kernel), dtype=image.dtype)
    for m in range(full.shape[0]):
        for l in range(full.shape[1]):
            full[m, l] = np.sum(padded[m : m + kh, l : l + kw] * kernel)
    return full[window].copy()


def convolve2d_reference(image, kernel, mode="full"):
    """Convolution with loops: each image pixel adds a scaled copy of the kernel to the
    output, ``full[r : r+kH, c : c+kW] += image[r, c] * kernel``."""
    window = _signal_arguments(image, kernel, mode, convolve=True)
    kh, kw = kernel.shape
    full = np.zeros(_full_result_shape(image, kernel), dtype=image.dtype)
    for r in range(image.shape[0]):
        for c in range(image.shape[1]):
            full[r : r + kh, c : c + kw] += image[r, c] * kernel
    return full[window].copy()


# --- Fast kernels ---------------------------------------------------------------------------


def correlate2d(image, kernel, mode="full"):
    """2-D cross-correlation, equal to ``scipy.signal.correlate2d(image, kernel, mode)``.

    image (H, W) and kernel (kH, kW), both float32 or both float64; ``mode`` is ``"full"``
    (H + kH - 1, W + kW - 1), ``"same"`` (H, W) or ``"valid"`` (|H - kH| + 1, |W - kW| + 1).
    """
    window = _signal_arguments(image, kernel, mode, convolve=False)
    full = conv2d(image[None, None], kernel[None, None], padding="full")[0, 0]
    return full[window].copy()


def convolve2d(image, kernel, mode="full"):
    """2-D convolution, equal to ``scipy.signal.convolve2d(image, kernel, mode)``: the
    correlation with the kernel flipped in both axes. Shapes as :func:`correlate2d`."""
    window = _signal_arguments(image, kernel, mode, convolve=True)
    full = conv2d(image[None, None], kernel[None, None, ::-1, ::-1], padding="full")[0, 0]
    return full[window].copy()
