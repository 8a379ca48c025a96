"""Argument checks shared by the kernels (NumPy and CUDA), the layers and the losses.

This module sits at the bottom of the package, next to :mod:`minunet.shapes`: everything
above may use it, and it imports nothing of minunet but the shape arithmetic.

Each ``*_arguments`` function checks what the user passed and returns the resolved
geometry, so that a kernel starts from integers it can trust. The checks use only array
attributes (``shape``, ``dtype``), so they serve NumPy and CuPy arrays equally.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from minunet.shapes import (
    Padding2d,
    Pair,
    conv2d_output_shape,
    conv_transpose2d_output_shape,
    dilated_kernel_size,
    padded_shape,
    pair,
    pool2d_output_shape,
    resolve_padding,
    symmetric_padding,
)

FLOAT_DTYPES = ("float32", "float64")
# the one-letter codes of FLOAT_DTYPES ("fd"): dtype.char is a cheaper read than dtype.name
_FLOAT_DTYPE_CHARS = "".join(np.dtype(name).char for name in FLOAT_DTYPES)


def float_dtype(dtype) -> np.dtype:
    """Check ``dtype`` (``"float32"``, ``"float64"`` or the NumPy equivalent) and return it."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from exc
    if resolved.name not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return resolved


class ConvGeometry(NamedTuple):
    """Everything a kernel needs to know about a 2-D convolution (or pooling) window.

    ``in_hw`` is the unpadded input of the *convolution*, ``out_hw`` its output. For a
    transposed convolution these are swapped with respect to the user's view: its input has
    the size ``out_hw`` and its output the size ``in_hw`` (it is the convolution's input
    gradient, see :mod:`minunet.functional.conv_transpose`).
    """

    kernel_size: Pair
    stride: Pair
    padding: Padding2d  # ((top, bottom), (left, right))
    dilation: Pair
    in_hw: Pair
    out_hw: Pair

    @property
    def padded_hw(self) -> Pair:
        return padded_shape(self.in_hw, self.padding)


def check_float_array(x, name: str, layout: str):
    """``x`` must be a float32/float64 array with one axis per letter group of ``layout``.

    ``layout`` reads like ``"(N, C, H, W)"`` and appears in the error message.
    """
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}")
    if x.dtype.char not in _FLOAT_DTYPE_CHARS:
        raise TypeError(
            f"{name} must have dtype float32 or float64, got {x.dtype} "
            f"(convert it first, e.g. {name}.astype(np.float32))"
        )
    ndim = _axis_count(layout)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array {layout}, got shape {tuple(x.shape)}")
    return x


@functools.cache
def _axis_count(layout: str) -> int:
    """The axes of a layout such as ``"(N, C, H, W)"`` or ``"(C_out,)"``."""
    return len([axis for axis in layout.strip("()").split(",") if axis.strip()])


def check_floating(name: str, x) -> None:
    """``x`` is an array of any floating-point dtype (the losses accept every precision)."""
    if not hasattr(x, "dtype") or x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")


def check_class_target(logits, target, *, values: bool = True) -> None:
    """``target`` must be integer class indices of shape (N, *spatial) in [0, C) for
    ``logits`` (N, C, *spatial). ``values=False`` leaves out the range of the labels, whose
    reading waits for the GPU when they live there."""
    check_floating("logits", logits)
    if logits.ndim < 2:
        raise ValueError(f"logits must be (N, C, ...), got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if not hasattr(target, "dtype") or target.dtype.kind not in "iu":
        raise TypeError(f"target must be an integer array of class indices, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != expected:
        raise ValueError(f"target must have shape {expected} (logits without the class axis), "
                         f"got {tuple(target.shape)}")
    num_classes = logits.shape[1]
    if values and target.size and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target values must lie in [0, {num_classes}), "
                         f"got range [{int(target.min())}, {int(target.max())}]")


def check_pixel_weight(weight, expected_shape) -> None:
    """``weight`` is ``None`` or a floating-point weight map of ``expected_shape``."""
    if weight is None:
        return
    check_floating("weight", weight)
    if tuple(weight.shape) != tuple(expected_shape):
        raise ValueError(f"weight must have shape {tuple(expected_shape)}, "
                         f"got {tuple(weight.shape)}")


def check_same_dtype(reference_name: str, reference, **others) -> None:
    """Every array in ``others`` (``None`` allowed) has the dtype of ``reference``.

    Mixed precision would silently upcast in NumPy; we refuse it instead.
    """
    for name, array in others.items():
        if array is not None and array.dtype != reference.dtype:
            raise TypeError(
                f"{name} has dtype {array.dtype} but {reference_name} has dtype "
                f"{reference.dtype}; convert one of them so that they match"
            )


def check_bias(bias, channels: int, x) -> None:
    """``bias`` is ``None`` or a vector of ``channels`` values with the dtype of ``x``."""
    if bias is None:
        return
    check_float_array(bias, "bias", "(C_out,)")
    check_same_dtype("x", x, bias=bias)
    if bias.shape[0] != channels:
        raise ValueError(
            f"bias must have one value per output channel ({channels}), got {bias.shape[0]}"
        )


def check_grad_out(grad_out, expected_shape: tuple, x) -> None:
    """``grad_out`` has the shape of the forward output and the dtype of ``x``."""
    check_float_array(grad_out, "grad_out", "(N, C_out, H_out, W_out)")
    check_same_dtype("x", x, grad_out=grad_out)
    if tuple(grad_out.shape) != tuple(expected_shape):
        raise ValueError(
            f"grad_out must have the shape of the forward output {tuple(expected_shape)}, "
            f"got {tuple(grad_out.shape)}"
        )


def _check_kernel_fits(geometry: ConvGeometry, kernel_name: str) -> None:
    if min(geometry.out_hw) < 1:
        extent = tuple(
            dilated_kernel_size(k, d)
            for k, d in zip(geometry.kernel_size, geometry.dilation, strict=True)
        )
        raise ValueError(
            f"{kernel_name} {geometry.kernel_size} (extent {extent} with dilation "
            f"{geometry.dilation}) is larger than the padded input {geometry.padded_hw}"
        )


def _check_conv_operands(x, weight, bias, *, transposed: bool) -> None:
    """x (N, C_in, H, W), a convolution weight (C_out, C_in, kH, kW) or a transposed one
    (C_in, C_out, kH, kW) and a bias (C_out,) or None: arrays of one float dtype whose
    channels agree. Every axis of the weight has an element (as PyTorch requires): without
    channels or with a 0-pixel kernel there is nothing to compute."""
    layout = "(C_in, C_out, kH, kW)" if transposed else "(C_out, C_in, kH, kW)"
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    check_float_array(x, "x", "(N, C_in, H, W)")
    check_float_array(weight, "weight", layout)
    check_same_dtype("x", x, weight=weight)
    if min(weight.shape) < 1:
        raise ValueError(f"weight must have at least one element along every axis of "
                         f"{layout}, got shape {tuple(weight.shape)}")
    if weight.shape[in_axis] != x.shape[1]:
        kind = "a transposed-convolution weight" if transposed else "weight shape"
        raise ValueError(
            f"weight expects {weight.shape[in_axis]} input channels ({kind} "
            f"{tuple(weight.shape)} is {layout}), but x has {x.shape[1]} channels"
        )
    check_bias(bias, weight.shape[out_axis], x)


def conv2d_arguments(x, weight, bias, stride, padding, dilation) -> ConvGeometry:
    """Check the arguments of :func:`~minunet.functional.conv2d`; return its geometry."""
    _check_conv_operands(x, weight, bias, transposed=False)
    kernel_size = tuple(weight.shape[2:])
    stride = pair(stride, "stride", minimum=1)
    dilation = pair(dilation, "dilation", minimum=1)
    padding = resolve_padding(padding, kernel_size, stride, dilation)
    in_hw = tuple(x.shape[2:])
    out_hw = conv2d_output_shape(in_hw, kernel_size, stride, padding, dilation)
    geometry = ConvGeometry(kernel_size, stride, padding, dilation, in_hw, out_hw)
    _check_kernel_fits(geometry, "weight's kernel")
    return geometry


def conv_transpose2d_arguments(
    x, weight, bias, stride, padding, output_padding, dilation
) -> ConvGeometry:
    """Check the arguments of :func:`~minunet.functional.conv_transpose2d`.

    Returns the geometry of the *convolution* whose input gradient this transposed
    convolution computes: its ``in_hw`` is the transposed convolution's output size and its
    ``out_hw`` is ``x``'s size.
    """
    _check_conv_operands(x, weight, bias, transposed=True)
    kernel_size = tuple(weight.shape[2:])
    stride = pair(stride, "stride", minimum=1)
    dilation = pair(dilation, "dilation", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    output_padding = pair(output_padding, "output_padding", minimum=0)
    for op, s, d in zip(output_padding, stride, dilation, strict=True):
        if op >= max(s, d):
            raise ValueError(
                f"output_padding must be smaller than stride or dilation, got "
                f"output_padding={output_padding}, stride={stride}, dilation={dilation}"
            )
    out_hw = tuple(x.shape[2:])
    in_hw = conv_transpose2d_output_shape(
        out_hw, kernel_size, stride, padding, output_padding, dilation
    )
    if min(in_hw) < 1:
        raise ValueError(
            f"padding={padding} removes the whole output: the transposed convolution of a "
            f"{out_hw} input would have size {in_hw}"
        )
    return ConvGeometry(kernel_size, stride, symmetric_padding(padding), dilation, in_hw, out_hw)


def max_pool2d_arguments(x, kernel_size, stride, padding) -> ConvGeometry:
    """Check the arguments of :func:`~minunet.functional.max_pool2d`; return its geometry."""
    check_float_array(x, "x", "(N, C, H, W)")
    kernel_size = pair(kernel_size, "kernel_size", minimum=1)
    stride = kernel_size if stride is None else pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    if any(2 * p > k for p, k in zip(padding, kernel_size, strict=True)):
        # as in PyTorch: a window must never lie entirely in the padding
        raise ValueError(
            f"padding must be at most half the kernel size, got padding={padding} "
            f"and kernel_size={kernel_size}"
        )
    in_hw = tuple(x.shape[2:])
    out_hw = pool2d_output_shape(in_hw, kernel_size, stride, padding)
    geometry = ConvGeometry(
        kernel_size, stride, symmetric_padding(padding), (1, 1), in_hw, out_hw
    )
    _check_kernel_fits(geometry, "kernel_size")
    return geometry
