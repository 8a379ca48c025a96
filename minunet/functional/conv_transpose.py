"""Transposed convolution: the input gradient of a convolution, used as a layer.

A convolution ``y = conv2d(x, w)`` is linear in ``x``: ``y = A x`` for a big, sparse matrix
``A``. Its input gradient is ``A.T @ grad_y``. A *transposed convolution* is exactly that map
``A.T``, applied to a feature map to make it larger (the U-Net's "up-convolution"). Hence in
this package

* ``conv_transpose2d(x, w)`` **is** the input gradient of ``conv2d`` (one shared kernel,
  :func:`~minunet.functional.conv._input_gradient`);
* its input gradient is ``A @ grad``: a plain ``conv2d`` forward pass of ``grad_out``;
* its weight gradient is ``conv2d``'s weight gradient with the roles of the input and the
  upstream gradient exchanged.

Weights follow PyTorch: (C_in, C_out, kH, kW) for a transposed convolution from C_in to
C_out channels, which is the (C_out, C_in, kH, kW) layout of the convolution it transposes.
Every input pixel stamps a scaled copy of the kernel onto the output,

    out_pad[n, o, i*s_h + a*d_h, j*s_w + b*d_w] += x[n, c, i, j] * weight[c, o, a, b],

then ``padding`` rows/columns are cropped from each side:

    H_out = (H - 1)*s_h - 2*p_h + d_h*(kH - 1) + output_padding_h + 1.
"""

from __future__ import annotations

import numpy as np

from minunet.checks import check_grad_out, conv_transpose2d_arguments
from minunet.functional._dispatch import dispatch_on_array_type
from minunet.functional.conv import _column_products, _input_gradient
from minunet.functional.im2col import crop2d, pad2d, receptive_field

# --- Reference kernels ----------------------------------------------------------------------


def conv_transpose2d_reference(
    x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1
):
    """Transposed convolution with explicit loops: every input pixel stamps its kernel.

    x (N, C_in, H, W), weight (C_in, C_out, kH, kW), bias (C_out,) or None
    -> out (N, C_out, H_out, W_out):

        out_pad[n, :, window(i, j)] += x[n, c, i, j] * weight[c]     then crop the padding.
    """
    geometry = conv_transpose2d_arguments(
        x, weight, bias, stride, padding, output_padding, dilation
    )
    batch, c_in = x.shape[:2]
    out_pad = np.zeros((batch, weight.shape[1], *geometry.padded_hw), dtype=x.dtype)
    for n in range(batch):
        for c in range(c_in):
            for i in range(x.shape[2]):
                for j in range(x.shape[3]):
                    rows, cols = receptive_field(i, j, geometry)
                    out_pad[n, :, rows, cols] += x[n, c, i, j] * weight[c]
    out = crop2d(out_pad, geometry)
    if bias is not None:
        out += bias[:, None, None]
    return out


def conv_transpose2d_backward_reference(
    grad_out, x, weight, stride=1, padding=0, output_padding=0, dilation=1
):
    """Gradients of :func:`conv_transpose2d_reference`, with the same loops.

    grad_out (N, C_out, H_out, W_out) -> (grad_x (N, C_in, H, W),
    grad_weight (C_in, C_out, kH, kW), grad_bias (C_out,)). Each stamp read ``x[n, c, i, j]``
    and ``weight[c]``, so

        grad_x[n, c, i, j] = sum(grad_out_pad[n, :, window(i, j)] * weight[c])
        grad_weight[c]    += x[n, c, i, j] * grad_out_pad[n, :, window(i, j)]
    """
    geometry = conv_transpose2d_arguments(
        x, weight, None, stride, padding, output_padding, dilation
    )
    check_grad_out(grad_out, (x.shape[0], weight.shape[1], *geometry.in_hw), x)
    grad_out_pad = pad2d(grad_out, geometry.padding)
    grad_x = np.zeros_like(x)
    grad_weight = np.zeros_like(weight)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(x.shape[2]):
                for j in range(x.shape[3]):
                    rows, cols = receptive_field(i, j, geometry)
                    patch = grad_out_pad[n, :, rows, cols]
                    grad_x[n, c, i, j] = np.sum(patch * weight[c])
                    grad_weight[c] += x[n, c, i, j] * patch
    return grad_x, grad_weight, grad_out.sum(axis=(0, 2, 3))


# --- Fast kernels: the convolution kernels, roles exchanged ---------------------------------


@dispatch_on_array_type
def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1):
    """2-D transposed convolution (PyTorch's ``conv_transpose2d``).

    Args:
        x: (N, C_in, H, W), float32 or float64.
        weight: (C_in, C_out, kH, kW), same dtype as ``x``.
        bias: (C_out,) or None.
        stride, dilation: int or (rows, cols), positive.
        padding: int or (rows, cols) >= 0, cropped from each side of the output.
        output_padding: int or (rows, cols), smaller than the stride or the dilation; extra
            rows/columns at the bottom/right that choose among the input sizes a strided
            convolution maps to the same output size.

    Returns:
        (N, C_out, H_out, W_out), where
        ``H_out = (H - 1)*s_h - 2*p_h + d_h*(kH - 1) + output_padding_h + 1``.

    It is computed as the input gradient of ``conv2d(., weight)`` with upstream gradient
    ``x``: the same kernel that :func:`~minunet.functional.conv2d_backward` uses.
    """
    geometry = conv_transpose2d_arguments(
        x, weight, bias, stride, padding, output_padding, dilation
    )
    out = _input_gradient(x, weight, geometry)
    if bias is not None:
        out += bias[:, None, None]
    return out


@dispatch_on_array_type
def conv_transpose2d_backward(
    grad_out, x, weight, stride=1, padding=0, output_padding=0, dilation=1, *,
    input_gradient=True,
):
    """Gradients of :func:`conv_transpose2d` given ``grad_out`` (N, C_out, H_out, W_out).

    Returns ``(grad_x, grad_weight, grad_bias)`` with the shapes of ``x``, ``weight`` and
    the bias (C_out,):

    * grad_x      = conv2d(grad_out, weight): the transpose of a transpose is the original
      convolution;
    * grad_weight = conv2d's weight gradient with ``x`` as the upstream gradient and
      ``grad_out`` as the input;
    * grad_bias   = grad_out summed over n, i, j.

    With ``input_gradient=False`` grad_x is not computed and is None.
    """
    geometry = conv_transpose2d_arguments(
        x, weight, None, stride, padding, output_padding, dilation
    )
    check_grad_out(grad_out, (x.shape[0], weight.shape[1], *geometry.in_hw), x)
    # conv.py's _correlate(grad_out, weight) and _weight_gradient(x, grad_out) both read the
    # columns of grad_out: one pass over them serves the two products
    grad_x, grad_weight = _column_products(
        grad_out, geometry, weight=weight if input_gradient else None, grad_out=x)
    return grad_x, grad_weight, grad_out.sum(axis=(0, 2, 3))
