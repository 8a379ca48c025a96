"""Launching the CUDA kernels on CuPy arrays: the GPU side of :mod:`minunet.functional`.

The kernel functions of :mod:`minunet.functional` send CuPy arrays here, to the function of
the same name and signature. Each function below is *host code*: it checks the arguments
(with the same checks as the NumPy kernels), works out the sizes (with
:mod:`minunet.shapes`), allocates the outputs, picks a grid of thread blocks and launches
kernels from the ``.cu`` files of this package.

Who executes the launches is the ``runner``: by default :class:`CupyRunner`, which compiles
each file once per element type with ``cupy.RawModule`` and runs it on the GPU. The tests
pass a runner that executes the same kernels on the CPU, so this module is checked line for
line on machines without a GPU. A runner has ``xp`` (its array module), ``empty(shape,
dtype)``, ``zeros(shape, dtype)``, ``contiguous(x)`` (``x`` as a C-contiguous array of the
runner) and ``kernel(file, name, dtype)``, returning a callable ``kernel(grid, block, args)``
as ``cupy.RawKernel`` is.

Convolutions take ``algorithm="tiled"`` (shared-memory implicit GEMM, the default) or
``"naive"`` (one thread per output element); both give the same numbers up to rounding.
Kernel indices are 32-bit ``int``: every array must have fewer than 2**31 elements.

Cropping and concatenating feature maps (the U-Net's skip connections) are pure copies, which
CuPy's slicing and ``cupy.concatenate`` already do at memory speed; they have no kernel here.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from minunet.backend import require_cupy
from minunet.cuda import compile_options, defined_constant, source
from minunet.functional._validate import (
    FLOAT_DTYPES,
    ConvGeometry,
    check_grad_out,
    check_same_dtype,
    conv2d_arguments,
    conv_transpose2d_arguments,
    max_pool2d_arguments,
)
from minunet.losses import _check_class_target, _check_weight

THREADS_PER_BLOCK = 256  # 1-D launches: eight warps per block
TILE = defined_constant("conv2d.cu", "TILE")  # tiled kernels: TILE x TILE threads per block
SUM_THREADS = defined_constant("reduction.cu", "SUM_THREADS")  # threads per channel sum
ALGORITHMS = ("tiled", "naive")
INT_MAX = 2**31 - 1


# --- Runners --------------------------------------------------------------------------------


class CupyRunner:
    """Runs the kernels on the GPU through CuPy (the default ``runner`` of every op)."""

    def __init__(self):
        self.xp = require_cupy()

    def kernel(self, file: str, name: str, dtype):
        return _cupy_module(file, np.dtype(dtype).name).get_function(name)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def contiguous(self, x):
        return self.xp.ascontiguousarray(x)


@functools.cache
def _cupy_module(file: str, dtype_name: str):
    """``cupy.RawModule`` of one kernel file for one dtype, compiled on first use."""
    cp = require_cupy()
    return cp.RawModule(code=source(file), options=compile_options(dtype_name))


@functools.cache
def gpu_runner() -> CupyRunner:
    """The shared :class:`CupyRunner`; raises a clear RuntimeError without CuPy or a GPU."""
    return CupyRunner()


def _runner(runner):
    return gpu_runner() if runner is None else runner


# --- Launching ------------------------------------------------------------------------------


def _int(value: int, what: str) -> np.int32:
    """``value`` as the C ``int`` a kernel takes, refusing what would overflow it."""
    if not 0 <= value <= INT_MAX:
        raise ValueError(f"{what} = {value} does not fit the kernels' 32-bit int indices")
    return np.int32(value)


def _check_float(name: str, x, min_ndim: int = 0) -> None:
    """``x`` is a float32/float64 array with at least ``min_ndim`` axes."""
    if not hasattr(x, "dtype") or x.dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} axes, got shape {x.shape}")


def _check_size(*arrays) -> None:
    for array in arrays:
        if array is not None and array.size > INT_MAX:
            raise ValueError(
                f"an array of shape {tuple(array.shape)} has {array.size} elements; the CUDA "
                f"kernels index with 32-bit int and take fewer than 2**31"
            )


def _launch_1d(kernel, count: int, args) -> None:
    """One thread per element: ``count`` threads in blocks of THREADS_PER_BLOCK."""
    if count > 0:
        kernel((-(-count // THREADS_PER_BLOCK),), (THREADS_PER_BLOCK,), args)


# --- Convolution ----------------------------------------------------------------------------


class ConvSizes(NamedTuple):
    """The fifteen sizes every kernel of ``conv2d.cu`` takes, in its order (CONV_SIZES)."""

    batch: int
    in_channels: int
    in_h: int
    in_w: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    out_h: int
    out_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    dilation_h: int
    dilation_w: int

    @classmethod
    def of(cls, batch: int, in_channels: int, out_channels: int, g: ConvGeometry) -> ConvSizes:
        """Sizes of the convolution ``in_channels -> out_channels`` with geometry ``g``;
        refuses (ValueError) what the kernels' int indices cannot address."""
        (top, _), (left, _) = g.padding
        sizes = cls(batch, in_channels, *g.in_hw, out_channels, *g.kernel_size, *g.out_hw,
                    *g.stride, top, left, *g.dilation)
        sizes.kernel_args()
        return sizes

    def kernel_args(self) -> tuple[np.int32, ...]:
        """The sizes as C ints, after checking that no tensor of the convolution (input,
        output, weight) has 2**31 elements or more."""
        _int(self.batch * self.in_channels * self.in_h * self.in_w, "the input's element count")
        _int(self.batch * self.out_channels * self.out_h * self.out_w,
             "the output's element count")
        _int(self.out_channels * self.in_channels * self.kernel_h * self.kernel_w,
             "the weight's element count")
        return tuple(_int(value, name) for name, value in zip(self._fields, self, strict=True))


# Each pass as a matrix product: (rows, columns) of its result (see conv2d.cu).
_CONV_PASSES = {
    "forward": lambda s: (s.out_channels, s.batch * s.out_h * s.out_w),
    "input_grad": lambda s: (s.in_channels, s.batch * s.in_h * s.in_w),
    "weight_grad": lambda s: (s.out_channels, s.in_channels * s.kernel_h * s.kernel_w),
}


def _conv_pass(run, pass_name: str, algorithm: str, sizes: ConvSizes, inputs, out):
    """Launch ``conv2d_<pass_name>_<algorithm>`` writing ``out``; returns ``out``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    rows, cols = _CONV_PASSES[pass_name](sizes)
    kernel = run.kernel("conv2d.cu", f"conv2d_{pass_name}_{algorithm}", out.dtype)
    args = (*inputs, out, *sizes.kernel_args())
    if algorithm == "naive":
        _launch_1d(kernel, rows * cols, args)
    elif rows * cols > 0:
        kernel((-(-cols // TILE), -(-rows // TILE)), (TILE, TILE), args)
    return out


def _bias_or_zeros(run, bias, channels: int, dtype):
    return run.zeros((channels,), dtype) if bias is None else run.contiguous(bias)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, *, algorithm="tiled",
           runner=None):
    """2-D convolution on the GPU; arguments, shapes and result as
    :func:`minunet.functional.conv2d`: x (N, C_in, H, W), weight (C_out, C_in, kH, kW),
    bias (C_out,) or None -> (N, C_out, H_out, W_out)."""
    geometry = conv2d_arguments(x, weight, bias, stride, padding, dilation)
    _check_size(x, weight)
    run = _runner(runner)
    sizes = ConvSizes.of(x.shape[0], x.shape[1], weight.shape[0], geometry)
    y = run.empty((x.shape[0], weight.shape[0], *geometry.out_hw), x.dtype)
    inputs = (run.contiguous(x), run.contiguous(weight),
              _bias_or_zeros(run, bias, weight.shape[0], x.dtype))
    return _conv_pass(run, "forward", algorithm, sizes, inputs, y)


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, *,
                    algorithm="tiled", runner=None):
    """Gradients of :func:`conv2d`: ``(grad_x, grad_weight, grad_bias)`` with the shapes of
    x (N, C_in, H, W), weight (C_out, C_in, kH, kW) and the bias (C_out,), given
    grad_out (N, C_out, H_out, W_out); as :func:`minunet.functional.conv2d_backward`."""
    geometry = conv2d_arguments(x, weight, None, stride, padding, dilation)
    check_grad_out(grad_out, (x.shape[0], weight.shape[0], *geometry.out_hw), x)
    _check_size(grad_out, x, weight)
    run = _runner(runner)
    sizes = ConvSizes.of(x.shape[0], x.shape[1], weight.shape[0], geometry)
    grad_out, x, weight = run.contiguous(grad_out), run.contiguous(x), run.contiguous(weight)
    no_bias = run.zeros((x.shape[1],), x.dtype)
    grad_x = _conv_pass(run, "input_grad", algorithm, sizes, (grad_out, weight, no_bias),
                        run.empty(x.shape, x.dtype))
    grad_weight = _conv_pass(run, "weight_grad", algorithm, sizes, (grad_out, x),
                             run.empty(weight.shape, x.dtype))
    return grad_x, grad_weight, channel_sum(grad_out, runner=run)


# A transposed convolution with weight (C_in, C_out, kH, kW) is the input gradient of the
# convolution C_out -> C_in with the same weight: the conv's "input" is its output, the conv's
# "output" its input (ConvGeometry.in_hw / out_hw are set up that way by the validation).


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                     *, algorithm="tiled", runner=None):
    """2-D transposed convolution on the GPU, as :func:`minunet.functional.conv_transpose2d`:
    x (N, C_in, H, W), weight (C_in, C_out, kH, kW), bias (C_out,) or None ->
    (N, C_out, H_out, W_out) with ``H_out = (H-1)*s - 2*p + d*(kH-1) + output_padding + 1``.
    One launch of the convolution's input-gradient kernel, with the bias added in it."""
    geometry = conv_transpose2d_arguments(x, weight, bias, stride, padding, output_padding,
                                          dilation)
    _check_size(x, weight)
    run = _runner(runner)
    sizes = ConvSizes.of(x.shape[0], weight.shape[1], weight.shape[0], geometry)
    y = run.empty((x.shape[0], weight.shape[1], *geometry.in_hw), x.dtype)
    inputs = (run.contiguous(x), run.contiguous(weight),
              _bias_or_zeros(run, bias, weight.shape[1], x.dtype))
    return _conv_pass(run, "input_grad", algorithm, sizes, inputs, y)


def conv_transpose2d_backward(grad_out, x, weight, stride=1, padding=0, output_padding=0,
                              dilation=1, *, algorithm="tiled", runner=None):
    """Gradients of :func:`conv_transpose2d`: ``(grad_x, grad_weight, grad_bias)``, given
    grad_out (N, C_out, H_out, W_out). grad_x is the forward convolution of grad_out,
    grad_weight the convolution's weight gradient with the roles of x and grad_out swapped."""
    geometry = conv_transpose2d_arguments(x, weight, None, stride, padding, output_padding,
                                          dilation)
    check_grad_out(grad_out, (x.shape[0], weight.shape[1], *geometry.in_hw), x)
    _check_size(grad_out, x, weight)
    run = _runner(runner)
    sizes = ConvSizes.of(x.shape[0], weight.shape[1], weight.shape[0], geometry)
    grad_out, x, weight = run.contiguous(grad_out), run.contiguous(x), run.contiguous(weight)
    no_bias = run.zeros((weight.shape[0],), x.dtype)
    grad_x = _conv_pass(run, "forward", algorithm, sizes, (grad_out, weight, no_bias),
                        run.empty(x.shape, x.dtype))
    grad_weight = _conv_pass(run, "weight_grad", algorithm, sizes, (x, grad_out),
                             run.empty(weight.shape, x.dtype))
    return grad_x, grad_weight, channel_sum(grad_out, runner=run)


# --- Max-pooling ----------------------------------------------------------------------------


def _pool_args(x, geometry: ConvGeometry) -> tuple[np.int32, ...]:
    """planes, in_h, in_w, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_top,
    pad_left: the sizes the kernels of max_pool2d.cu take."""
    (top, _), (left, _) = geometry.padding
    values = (x.shape[0] * x.shape[1], *geometry.in_hw, *geometry.out_hw,
              *geometry.kernel_size, *geometry.stride, top, left)
    return tuple(_int(v, "a max-pooling size") for v in values)


def _max_pool_forward(run, x, geometry: ConvGeometry):
    """``(y, argmax)``: the pooled maxima and the int32 flat position ``ih*W + iw`` of each."""
    out_shape = (*x.shape[:2], *geometry.out_hw)
    y, argmax = run.empty(out_shape, x.dtype), run.empty(out_shape, np.int32)
    kernel = run.kernel("max_pool2d.cu", "max_pool2d_forward", x.dtype)
    _launch_1d(kernel, y.size, (run.contiguous(x), y, argmax, *_pool_args(x, geometry)))
    return y, argmax


def max_pool2d(x, kernel_size, stride=None, padding=0, return_indices=False, *, runner=None):
    """2-D max-pooling on the GPU, as :func:`minunet.functional.max_pool2d`:
    x (N, C, H, W) -> (N, C, H_out, W_out), and the int64 flat indices ``row*W + col`` of the
    winners when ``return_indices`` (first maximum in row-major window order)."""
    geometry = max_pool2d_arguments(x, kernel_size, stride, padding)
    _check_size(x)
    y, argmax = _max_pool_forward(_runner(runner), x, geometry)
    return (y, argmax.astype(np.int64)) if return_indices else y


def max_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0, indices=None, *,
                        runner=None):
    """Gradient of :func:`max_pool2d`: grad_out (N, C, H_out, W_out) -> grad_x (N, C, H, W).

    Each input pixel gathers the gradients of the windows it won; without ``indices`` the
    winners are found again by the forward kernel."""
    geometry = max_pool2d_arguments(x, kernel_size, stride, padding)
    check_grad_out(grad_out, (*x.shape[:2], *geometry.out_hw), x)
    _check_size(x)
    run = _runner(runner)
    if indices is None:
        _, argmax = _max_pool_forward(run, x, geometry)
    elif tuple(indices.shape) != tuple(grad_out.shape) or indices.dtype.kind not in "iu":
        raise ValueError(
            f"indices must be the integer array returned by max_pool2d(..., "
            f"return_indices=True), of shape {tuple(grad_out.shape)}; got {indices.dtype} "
            f"of shape {tuple(indices.shape)}"
        )
    else:
        argmax = run.contiguous(indices.astype(np.int32))
    grad_x = run.empty(x.shape, x.dtype)
    kernel = run.kernel("max_pool2d.cu", "max_pool2d_backward", x.dtype)
    _launch_1d(kernel, grad_x.size,
               (run.contiguous(grad_out), argmax, grad_x, *_pool_args(x, geometry)))
    return grad_x


# --- Reductions, activations, loss ----------------------------------------------------------


def channel_sum(x, *, runner=None):
    """``out[c] = sum_{n, pixels} x[n, c, ...]`` for x (N, C, ...) -> (C,): the bias gradient
    of a convolution. Deterministic (a fixed tree of additions, no atomics)."""
    _check_float("x", x, min_ndim=2)
    _check_size(x)
    run = _runner(runner)
    batch, channels = x.shape[:2]
    pixels = x.size // max(batch * channels, 1)
    out = run.empty((channels,), x.dtype)
    if channels:
        kernel = run.kernel("reduction.cu", "channel_sum", x.dtype)
        kernel((channels,), (SUM_THREADS,),
               (run.contiguous(x), out, _int(batch, "batch"), _int(channels, "channels"),
                _int(pixels, "pixels")))
    return out


def _check_like(reference_name: str, reference, **others) -> None:
    """Every array in ``others`` has the shape and dtype of ``reference``."""
    check_same_dtype(reference_name, reference, **others)
    for name, array in others.items():
        if tuple(array.shape) != tuple(reference.shape):
            raise ValueError(f"{name} must have the shape of {reference_name} "
                             f"{tuple(reference.shape)}, got {tuple(array.shape)}")


def relu(x, *, runner=None):
    """``max(x, 0)`` elementwise, any shape, float32/float64; a new array."""
    _check_float("x", x)
    _check_size(x)
    run = _runner(runner)
    y = run.empty(x.shape, x.dtype)
    _launch_1d(run.kernel("elementwise.cu", "relu_forward", x.dtype), x.size,
               (run.contiguous(x), y, _int(x.size, "size")))
    return y


def relu_backward(grad_out, x, *, runner=None):
    """Gradient of :func:`relu`: ``grad_out`` where ``x > 0``, else 0 (also at 0)."""
    _check_float("x", x)
    _check_like("x", x, grad_out=grad_out)
    _check_size(x)
    run = _runner(runner)
    grad_x = run.empty(x.shape, x.dtype)
    _launch_1d(run.kernel("elementwise.cu", "relu_backward", x.dtype), x.size,
               (run.contiguous(grad_out), run.contiguous(x), grad_x, _int(x.size, "size")))
    return grad_x


def softmax_cross_entropy(logits, target, weight=None, *, runner=None):
    """Pixel-wise weighted softmax cross-entropy and its gradient in one kernel, as
    :func:`minunet.losses.softmax_cross_entropy`: logits (N, K, H, W), target (N, H, W)
    integers in [0, K), weight (N, H, W) or None; with M = N*H*W,

        loss = (1/M) sum_pixels w * (-log softmax(logits)_target)
        grad = (1/M) w * (softmax(logits) - one_hot(target))

    Returns ``(loss, grad_logits)``, the loss a 0-d array of the logits' dtype."""
    _check_class_target(logits, target)
    _check_weight(weight, target.shape)
    check_same_dtype("logits", logits, weight=weight)
    _check_size(logits)
    run = _runner(runner)
    batch, classes = logits.shape[:2]
    pixels = target.size // max(batch, 1)
    if weight is None:
        weight = run.xp.ones(target.shape, dtype=logits.dtype)
    pixel_loss = run.empty((batch, 1, pixels), logits.dtype)
    grad = run.empty(logits.shape, logits.dtype)
    scale = logits.dtype.type(1.0 / max(target.size, 1))
    kernel = run.kernel("softmax_cross_entropy.cu", "softmax_cross_entropy", logits.dtype)
    _launch_1d(kernel, target.size,
               (run.contiguous(logits), run.contiguous(target.astype(np.int32)),
                run.contiguous(weight), pixel_loss, grad, _int(batch, "batch"),
                _int(classes, "classes"), _int(pixels, "pixels"), scale))
    return channel_sum(pixel_loss, runner=run).reshape(()), grad


# --- Optimiser updates (in place) -----------------------------------------------------------


def _check_in_place(param, **state) -> None:
    """``param`` and its state: same shape and float dtype, C-contiguous (updated in place)."""
    _check_float("param", param)
    _check_like("param", param, **state)
    for name, array in {"param": param, **state}.items():
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous: it is updated in place")
    _check_size(param)


def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay=0.0, *, runner=None):
    """One SGD-with-momentum step, IN PLACE on ``param`` and ``velocity`` (PyTorch's rule, as
    :class:`minunet.optim.SGD`): ``g = grad + weight_decay*param``,
    ``velocity = momentum*velocity + g``, ``param -= lr*velocity``. Returns None."""
    _check_in_place(param, grad=grad, velocity=velocity)
    run = _runner(runner)
    t = param.dtype.type
    _launch_1d(run.kernel("optimizers.cu", "sgd_momentum_update", param.dtype), param.size,
               (param, run.contiguous(grad), velocity, _int(param.size, "size"), t(lr),
                t(momentum), t(weight_decay)))


def adam_update(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, *, runner=None):
    """One Adam step number ``step`` (1, 2, ...), IN PLACE on ``param``, ``m`` and ``v``
    (PyTorch's rule, as :class:`minunet.optim.Adam`)::

        g = grad + weight_decay*param;  m = beta1*m + (1-beta1)*g;  v = beta2*v + (1-beta2)*g^2
        param -= lr/(1 - beta1**step) * m / (sqrt(v)/sqrt(1 - beta2**step) + eps)

    Returns None."""
    _check_in_place(param, grad=grad, m=m, v=v)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step!r}")
    run = _runner(runner)
    t = param.dtype.type
    _launch_1d(run.kernel("optimizers.cu", "adam_update", param.dtype), param.size,
               (param, run.contiguous(grad), m, v, _int(param.size, "size"), t(lr), t(beta1),
                t(beta2), t(eps), t(weight_decay), t(1 - beta1**step), t(1 - beta2**step)))


__all__ = [
    "ALGORITHMS", "CupyRunner", "adam_update", "channel_sum", "conv2d", "conv2d_backward",
    "conv_transpose2d", "conv_transpose2d_backward", "gpu_runner", "max_pool2d",
    "max_pool2d_backward", "relu", "relu_backward", "sgd_momentum_update",
    "softmax_cross_entropy",
]
