"""2-D convolution and its gradients.

Conventions are PyTorch's: ``x`` is (N, C_in, H, W), ``weight`` is (C_out, C_in, kH, kW),
and "convolution" means cross-correlation (the kernel is not flipped):

    out[n, o, i, j] = bias[o]
                      + sum_{c, a, b} weight[o, c, a, b] * x_pad[n, c, i*s_h + a*d_h, j*s_w + b*d_w]

    H_out = floor((H + p_top + p_bottom - d_h*(kH - 1) - 1) / s_h) + 1     (likewise W_out)

The fast kernels are three matrix products around :func:`~minunet.functional.im2col.im2col`
(with ``K = C_in*kH*kW`` and ``L = H_out*W_out``):

* forward:         out    (C_out, L) = weight (C_out, K) @ cols (K, L)
* weight gradient: grad_w (C_out, K) = grad_out (C_out, L) @ cols.T (L, K)      (summed over n)
* input gradient:  grad_x = col2im(weight.T (K, C_out) @ grad_out (C_out, L))

The input gradient *is* the transposed convolution: :mod:`~minunet.functional.conv_transpose`
is built from the very same three private kernels (:func:`_correlate`,
:func:`_weight_gradient`, :func:`_input_gradient`) with the roles of the arrays exchanged.
"""

from __future__ import annotations

import math

import numpy as np

from minunet.functional._dispatch import dispatch_on_array_type
from minunet.functional._validate import ConvGeometry, check_grad_out, conv2d_arguments
from minunet.functional.im2col import (
    col2im,
    crop2d,
    im2col,
    pad2d,
    receptive_field,
    row_bands,
)

# --- Reference kernels: loops that read like the equations ---------------------------------


def conv2d_reference(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """2-D convolution with explicit loops over output pixels.

    x (N, C_in, H, W), weight (C_out, C_in, kH, kW), bias (C_out,) or None
    -> out (N, C_out, H_out, W_out), where

        out[n, o, i, j] = bias[o]
                      + sum_{c, a, b} weight[o, c, a, b] * x_pad[n, c, i*s_h + a*d_h, j*s_w + b*d_w]

    Arguments as :func:`conv2d`.
    """
    geometry = conv2d_arguments(x, weight, bias, stride, padding, dilation)
    x_pad = pad2d(x, geometry.padding)
    batch, c_out = x.shape[0], weight.shape[0]
    out = np.zeros((batch, c_out, *geometry.out_hw), dtype=x.dtype)
    for n in range(batch):
        for o in range(c_out):
            for i in range(geometry.out_hw[0]):
                for j in range(geometry.out_hw[1]):
                    rows, cols = receptive_field(i, j, geometry)
                    out[n, o, i, j] = np.sum(weight[o] * x_pad[n, :, rows, cols])
    if bias is not None:
        out += bias[:, None, None]
    return out


def conv2d_backward_reference(grad_out, x, weight, stride=1, padding=0, dilation=1):
    """Gradients of :func:`conv2d_reference`, with the same loops.

    grad_out (N, C_out, H_out, W_out) -> (grad_x (N, C_in, H, W),
    grad_weight (C_out, C_in, kH, kW), grad_bias (C_out,)). Each output pixel sends its
    upstream gradient back along the products that made it:

        grad_x_pad[n, :, window(i, j)] += grad_out[n, o, i, j] * weight[o]
        grad_weight[o]                 += grad_out[n, o, i, j] * x_pad[n, :, window(i, j)]
        grad_bias[o]                    = sum_{n, i, j} grad_out[n, o, i, j]
    """
    geometry = conv2d_arguments(x, weight, None, stride, padding, dilation)
    check_grad_out(grad_out, (x.shape[0], weight.shape[0], *geometry.out_hw), x)
    x_pad = pad2d(x, geometry.padding)
    grad_x_pad = np.zeros_like(x_pad)
    grad_weight = np.zeros_like(weight)
    for n in range(x.shape[0]):
        for o in range(weight.shape[0]):
            for i in range(geometry.out_hw[0]):
                for j in range(geometry.out_hw[1]):
                    rows, cols = receptive_field(i, j, geometry)
                    g = grad_out[n, o, i, j]
                    grad_x_pad[n, :, rows, cols] += g * weight[o]
                    grad_weight[o] += g * x_pad[n, :, rows, cols]
    return crop2d(grad_x_pad, geometry), grad_weight, grad_out.sum(axis=(0, 2, 3))


# --- Fast kernels: im2col + one matrix product ---------------------------------------------


# im2col of a large image is built one band of output rows at a time, in one reused buffer of
# this size: the memory stays bounded, and (measured on the U-Net's first and last levels) the
# smaller working set makes the convolution faster, not slower.
COLUMN_BUDGET_BYTES = 64 * 2**20


def _is_pointwise(geometry: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded convolution: the input already *is* its column matrix.

    With a 1x1 kernel and stride 1, equal input and output sizes mean no padding (and, for a
    transposed convolution, no output_padding).
    """
    one_by_one = geometry.kernel_size == (1, 1) and geometry.stride == (1, 1)
    return one_by_one and geometry.in_hw == geometry.out_hw


def _banded_columns(x, geometry: ConvGeometry):
    """im2col of x (N, C, H, W), one image and one band of output rows at a time.

    Yields ``(n, output rows, cols)`` with cols (C*kH*kW, rows*W_out). Each band's columns
    overwrite the previous band's: use them before asking for the next.
    """
    if _is_pointwise(geometry):
        for n in range(x.shape[0]):
            yield n, slice(None), x[n].reshape(x.shape[1], -1)
        return
    x_pad = pad2d(x, geometry.padding)
    bands, buffer = row_bands(geometry, x.shape[1], x.dtype, COLUMN_BUDGET_BYTES)
    for n in range(x.shape[0]):
        for out_rows, in_rows, band in bands:
            yield n, out_rows, im2col(x_pad[n : n + 1, :, in_rows], band, buffer)[0]


def _correlate(x, weight, geometry: ConvGeometry):
    """Convolution without bias: x (N, C_in, H, W), weight (C_out, C_in, kH, kW)
    -> (N, C_out, H_out, W_out), as ``weight (C_out, K) @ cols (K, L)``."""
    c_out = weight.shape[0]
    weight_matrix = weight.reshape(c_out, -1)
    out = np.empty((x.shape[0], c_out, *geometry.out_hw), dtype=x.dtype)
    for n, rows, cols in _banded_columns(x, geometry):
        out[n, :, rows] = (weight_matrix @ cols).reshape(c_out, -1, geometry.out_hw[1])
    return out


def _weight_gradient(grad_out, x, geometry: ConvGeometry):
    """grad_weight (C_out, C_in, kH, kW) = sum_n grad_out[n] (C_out, L) @ cols[n].T (L, K).

    Computed as the transpose of ``cols[n] (K, L) @ grad_out[n].T (L, C_out)``: the same
    numbers, but OpenBLAS runs this orientation much faster when ``L`` is long.
    """
    c_out = grad_out.shape[1]
    transposed = np.zeros((x.shape[1] * math.prod(geometry.kernel_size), c_out), x.dtype)
    for n, rows, cols in _banded_columns(x, geometry):
        transposed += cols @ grad_out[n, :, rows].reshape(c_out, -1).T
    return transposed.T.reshape(c_out, x.shape[1], *geometry.kernel_size)


def _input_gradient(grad_out, weight, geometry: ConvGeometry):
    """grad_x (N, C_in, H, W) = col2im(weight.T (K, C_out) @ grad_out (C_out, L)).

    This one function is both the input gradient of :func:`conv2d` and the forward pass of
    :func:`~minunet.functional.conv_transpose2d`.
    """
    batch, c_out = grad_out.shape[:2]
    c_in = weight.shape[1]
    weight_matrix_t = weight.reshape(c_out, -1).T
    if _is_pointwise(geometry):
        grad_x = np.matmul(weight_matrix_t, grad_out.reshape(batch, c_out, -1))
        return grad_x.reshape(batch, c_in, *geometry.in_hw)
    grad_x_pad = np.zeros((batch, c_in, *geometry.padded_hw), dtype=grad_out.dtype)
    bands, buffer = row_bands(geometry, c_in, grad_out.dtype, COLUMN_BUDGET_BYTES)
    for n in range(batch):
        for out_rows, in_rows, band in bands:
            band_grad = grad_out[n, :, out_rows].reshape(c_out, -1)
            grad_cols = buffer[: weight_matrix_t.shape[0] * band_grad.shape[1]].reshape(
                weight_matrix_t.shape[0], band_grad.shape[1]
            )
            np.matmul(weight_matrix_t, band_grad, out=grad_cols)
            col2im(grad_cols[None], band, out=grad_x_pad[n : n + 1, :, in_rows])
    return crop2d(grad_x_pad, geometry)


@dispatch_on_array_type
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, PyTorch's ``conv2d``), vectorised with im2col.

    Args:
        x: (N, C_in, H, W), float32 or float64.
        weight: (C_out, C_in, kH, kW), same dtype as ``x``.
        bias: (C_out,) or None.
        stride, dilation: int or (rows, cols), positive.
        padding: int or (rows, cols) (zeros on both sides), ``"valid"`` (none), ``"same"``
            (stride 1 only; output size = input size; an odd total puts the extra pixel
            bottom/right, as PyTorch) or ``"full"`` (``d*(k-1)`` on every side).

    Returns:
        (N, C_out, H_out, W_out), where
        ``H_out = floor((H + p_top + p_bottom - d_h*(kH-1) - 1) / s_h) + 1`` and

        out[n, o, i, j] = bias[o]
                      + sum_{c, a, b} weight[o, c, a, b] * x_pad[n, c, i*s_h + a*d_h, j*s_w + b*d_w]
    """
    geometry = conv2d_arguments(x, weight, bias, stride, padding, dilation)
    out = _correlate(x, weight, geometry)
    if bias is not None:
        out += bias[:, None, None]
    return out


@dispatch_on_array_type
def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1):
    """Gradients of :func:`conv2d`, given the upstream gradient grad_out (N, C_out, H_out, W_out).

    Returns ``(grad_x, grad_weight, grad_bias)`` with the shapes of ``x``, ``weight`` and
    the bias (C_out,):

    * grad_weight = sum_n grad_out[n] @ im2col(x)[n].T  (a convolution of x with grad_out)
    * grad_x      = col2im(weight.T @ grad_out)        (the transposed convolution of grad_out)
    * grad_bias   = grad_out summed over n, i, j
    """
    geometry = conv2d_arguments(x, weight, None, stride, padding, dilation)
    check_grad_out(grad_out, (x.shape[0], weight.shape[0], *geometry.out_hw), x)
    return (
        _input_gradient(grad_out, weight, geometry),
        _weight_gradient(grad_out, x, geometry),
        grad_out.sum(axis=(0, 2, 3)),
    )
