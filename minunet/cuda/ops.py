"""Launching the CUDA kernels on CuPy arrays: the GPU side of :mod:`minunet.functional`.

The kernel functions of :mod:`minunet.functional` send CuPy arrays here, to the function of
the same name and signature. Each function below is *host code*: it checks the arguments
(with the same checks as the NumPy kernels), works out the sizes (with
:mod:`minunet.shapes`), allocates the outputs, picks a grid of thread blocks and launches
kernels from the ``.cu`` files of this package.

Who executes the launches is the *runner* that :func:`gpu_runner` returns: a
:class:`CupyRunner`, which compiles each file once per element type with ``cupy.RawModule``
and runs it on the GPU. A runner has ``xp`` (its array module), ``empty(shape, dtype)``,
``zeros(shape, dtype)``, ``contiguous(x)`` (``x`` as a C-contiguous array of the runner) and
``kernel(file, name, dtype)``, returning a callable ``kernel(grid, block, args)`` as
``cupy.RawKernel`` is. (The tests replace :func:`gpu_runner` with one that executes the
same kernels on the CPU, so this module is checked line for line on machines without a GPU.)

Convolutions take ``algorithm=`` one rung of the ladder of ``conv2d.cu``: ``"naive"`` (one
thread per output element), ``"tiled"`` (shared-memory implicit GEMM), ``"blocked"`` (register
blocking over a tap table, split-K weight gradient, the up-convolution's own kernels) or
``"pipelined"`` (blocked + double buffering + vectorised shared-memory reads, the default).
All give the same numbers up to rounding; sizes use the letters of ``conv2d.cu`` (x (N, C, H,
W), weight (K, C, R, S), y (N, K, P, Q)). Kernel indices are 32-bit ``int``: every array must
have fewer than 2**31 elements.

Cropping and concatenating feature maps (the U-Net's skip connections) are pure copies, which
CuPy's slicing and ``cupy.concatenate`` already do at memory speed; they have no kernel here.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from minunet.backend import is_cupy_array, require_cupy
from minunet.checks import (
    FLOAT_DTYPES,
    ConvGeometry,
    check_class_target,
    check_grad_out,
    check_pixel_weight,
    check_same_dtype,
    conv2d_arguments,
    conv_transpose2d_arguments,
    max_pool2d_arguments,
)
from minunet.cuda import compile_options, defined_constant, source

THREADS_PER_BLOCK = 256  # 1-D launches: eight warps per block
TILE = defined_constant("conv2d.cu", "TILE")  # tiled kernels: TILE x TILE threads per block
# blocked kernels: BLOCKED_THREADS threads compute a BLOCK_ROWS x BLOCK_COLS tile of C
BLOCK_ROWS, BLOCK_COLS, BLOCK_DEPTH, BLOCKED_THREADS = (
    defined_constant("conv2d.cu", name)
    for name in ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_DEPTH", "BLOCKED_THREADS"))
# split-K: about two blocks per multiprocessor of a 132-SM GPU (H100/H200), and no depth
# slice shorter than four steps
SPLIT_TARGET_BLOCKS = 264
MIN_SPLIT_DEPTH = 4 * BLOCK_DEPTH
SUM_THREADS = defined_constant("reduction.cu", "SUM_THREADS")  # threads per channel sum
ALGORITHMS = ("naive", "tiled", "blocked", "pipelined")  # the ladder of conv2d.cu, slowest first
DEFAULT_ALGORITHM = "pipelined"
INT_MAX = 2**31 - 1


# --- Runners --------------------------------------------------------------------------------


class CupyRunner:
    """Runs the kernels on the GPU through CuPy."""

    def __init__(self):
        self.xp = require_cupy()

    def kernel(self, file: str, name: str, dtype):
        return _cupy_module(file, np.dtype(dtype).name).get_function(name)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def contiguous(self, x):
        """``x`` as a C-contiguous GPU array (copied there first if it is a host array)."""
        return self.xp.ascontiguousarray(self.xp.asarray(x))


@functools.cache
def _cupy_module(file: str, dtype_name: str):
    """``cupy.RawModule`` of one kernel file for one dtype, compiled on first use."""
    cp = require_cupy()
    return cp.RawModule(code=source(file), options=compile_options(dtype_name))


@functools.cache
def gpu_runner() -> CupyRunner:
    """The shared :class:`CupyRunner`; raises a clear RuntimeError without CuPy or a GPU."""
    return CupyRunner()


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
# Letters as in conv2d.cu: x (N, C, H, W), weight (K, C, R, S), y (N, K, P, Q).


class ConvSizes(NamedTuple):
    """The fifteen sizes every convolution kernel of ``conv2d.cu`` takes, in its order."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    P: int
    Q: int
    stride_h: int
    stride_w: int
    pad_h: int  # top
    pad_w: int  # left
    dilation_h: int
    dilation_w: int

    @classmethod
    def of(cls, N: int, C: int, K: int, g: ConvGeometry) -> ConvSizes:
        """Sizes of the convolution with N images, C -> K channels and geometry ``g``;
        refuses (ValueError) what the kernels' int indices cannot address."""
        (top, _), (left, _) = g.padding
        sizes = cls(N, C, *g.in_hw, K, *g.kernel_size, *g.out_hw, *g.stride, top, left,
                    *g.dilation)
        sizes.kernel_args()
        return sizes

    def kernel_args(self) -> tuple[np.int32, ...]:
        """The sizes as C ints, after checking that no tensor of the convolution (input,
        output, weight) has 2**31 elements or more."""
        _int(self.N * self.C * self.H * self.W, "the input's element count")
        _int(self.N * self.K * self.P * self.Q, "the output's element count")
        _int(self.K * self.C * self.R * self.S, "the weight's element count")
        return tuple(_int(value, name) for name, value in zip(self._fields, self, strict=True))


# Each pass as a matrix product C = A B: (rows, columns, depth) (see conv2d.cu).
_CONV_PASSES = {
    "forward": lambda s: (s.K, s.N * s.P * s.Q, s.C * s.R * s.S),
    "input_grad": lambda s: (s.C, s.N * s.H * s.W, s.K * s.R * s.S),
    "weight_grad": lambda s: (s.K, s.C * s.R * s.S, s.N * s.P * s.Q),
}


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


@functools.lru_cache(maxsize=256)
def _tap_table(run, pass_name: str, sizes: ConvSizes):
    """The tap table of the blocked kernels (``struct Tap`` of conv2d.cu): for each depth
    index of the pass, (offset, dh, dw, weight offset), as int32 on the runner's device.

    The forward pass walks d = (c, r, s) and reads x at offset c*H*W + dh*W + dw from the
    output pixel's corner; the input gradient walks d = (k, r, s), reads grad_out in plane
    k*P*Q and the weight at k*C*R*S + r*S + s. Built once per geometry (a host-to-device copy
    the first time only)."""
    g = sizes
    channels = g.C if pass_name == "forward" else g.K
    c, r, s = np.meshgrid(np.arange(channels), np.arange(g.R), np.arange(g.S), indexing="ij")
    dh, dw = r * g.dilation_h, s * g.dilation_w
    if pass_name == "forward":
        columns = (c * g.H * g.W + dh * g.W + dw, dh, dw, np.zeros_like(c))
    else:  # c runs over the output channels k here
        columns = (c * g.P * g.Q, dh, dw, c * g.C * g.R * g.S + r * g.S + s)
    table = np.stack([column.ravel() for column in columns], axis=1).astype(np.int32)
    return run.contiguous(table)


def _blocked_grid(rows: int, cols: int, slices: int = 1) -> tuple[int, int, int]:
    return -(-cols // BLOCK_COLS), -(-rows // BLOCK_ROWS), slices


def _split_depth(rows: int, cols: int, depth: int) -> int:
    """Depth per slice of a split-K launch: enough slices to give the GPU about
    SPLIT_TARGET_BLOCKS blocks, none shorter than MIN_SPLIT_DEPTH, a multiple of BLOCK_DEPTH.
    A function of the shape alone, so the sum (and its rounding) is the same on every run."""
    blocks = (-(-rows // BLOCK_ROWS)) * (-(-cols // BLOCK_COLS))
    slices = max(1, min(-(-SPLIT_TARGET_BLOCKS // blocks), depth // MIN_SPLIT_DEPTH))
    per_slice = -(-depth // slices)
    return max(BLOCK_DEPTH, -(-per_slice // BLOCK_DEPTH) * BLOCK_DEPTH)


def _split_k(run, kernel, rows: int, cols: int, depth: int, inputs, out, size_args):
    """Launch a weight-gradient ``kernel`` of the blocked rungs over depth slices into a
    workspace, then add the slices in a fixed order (conv2d_sum_splits); returns ``out``."""
    split_depth = _split_depth(rows, cols, depth)
    slices = max(1, -(-depth // split_depth))
    workspace = out if slices == 1 else run.empty((slices, *out.shape), out.dtype)
    _check_size(workspace)
    kernel(_blocked_grid(rows, cols, slices), (BLOCKED_THREADS,),
           (*inputs, workspace, _int(split_depth, "split depth"), *size_args))
    if slices > 1:
        _launch_1d(run.kernel("conv2d.cu", "conv2d_sum_splits", out.dtype), out.size,
                   (workspace, out, _int(slices, "slices"), _int(out.size, "size")))
    return out


def _conv_pass(run, pass_name: str, algorithm: str, sizes: ConvSizes, inputs, out,
               relu: bool = False):
    """Launch ``conv2d_<pass_name>_<algorithm>`` writing ``out``; returns ``out``. ``relu``
    (forward only) applies max(., 0) in the kernel's epilogue on the blocked rungs, and as a
    second launch on the others."""
    _check_algorithm(algorithm)
    rows, cols, depth = _CONV_PASSES[pass_name](sizes)
    if rows * cols == 0:
        return out
    kernel = run.kernel("conv2d.cu", f"conv2d_{pass_name}_{algorithm}", out.dtype)
    size_args = sizes.kernel_args()
    if algorithm in ("naive", "tiled"):
        args = (*inputs, out, *size_args)
        if algorithm == "naive":
            _launch_1d(kernel, rows * cols, args)
        else:
            kernel((-(-cols // TILE), -(-rows // TILE)), (TILE, TILE), args)
        return _relu_forward(run, out) if relu else out
    if pass_name == "weight_grad":
        return _split_k(run, kernel, rows, cols, depth, inputs, out, size_args)
    taps = _tap_table(run, pass_name, sizes)
    flags = (np.int32(relu),) if pass_name == "forward" else ()
    kernel(_blocked_grid(rows, cols), (BLOCKED_THREADS,),
           (*inputs, taps, out, *flags, *size_args))
    return out


def _bias_or_zeros(run, bias, channels: int, dtype):
    return run.zeros((channels,), dtype) if bias is None else run.contiguous(bias)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, *,
           algorithm=DEFAULT_ALGORITHM, relu=False):
    """2-D convolution on the GPU; arguments, shapes and result as
    :func:`minunet.functional.conv2d`: x (N, C, H, W), weight (K, C, R, S), bias (K,) or
    None -> (N, K, P, Q). ``relu=True`` returns ``max(y, 0)`` (fused into the kernel's
    epilogue on the blocked rungs); ``algorithm`` picks the rung of the ladder."""
    geometry = conv2d_arguments(x, weight, bias, stride, padding, dilation)
    _check_size(x, weight)
    run = gpu_runner()
    sizes = ConvSizes.of(x.shape[0], x.shape[1], weight.shape[0], geometry)
    y = run.empty((x.shape[0], weight.shape[0], *geometry.out_hw), x.dtype)
    inputs = (run.contiguous(x), run.contiguous(weight),
              _bias_or_zeros(run, bias, weight.shape[0], x.dtype))
    return _conv_pass(run, "forward", algorithm, sizes, inputs, y, relu=relu)


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, *,
                    input_gradient=True, algorithm=DEFAULT_ALGORITHM):
    """Gradients of :func:`conv2d`: ``(grad_x, grad_weight, grad_bias)`` with the shapes of
    x (N, C, H, W), weight (K, C, R, S) and the bias (K,), given grad_out (N, K, P, Q); as
    :func:`minunet.functional.conv2d_backward` (grad_x None with ``input_gradient=False``)."""
    geometry = conv2d_arguments(x, weight, None, stride, padding, dilation)
    check_grad_out(grad_out, (x.shape[0], weight.shape[0], *geometry.out_hw), x)
    _check_size(grad_out, x, weight)
    run = gpu_runner()
    sizes = ConvSizes.of(x.shape[0], x.shape[1], weight.shape[0], geometry)
    grad_out, x, weight = run.contiguous(grad_out), run.contiguous(x), run.contiguous(weight)
    grad_x = None
    if input_gradient:
        no_bias = run.zeros((x.shape[1],), x.dtype)
        grad_x = _conv_pass(run, "input_grad", algorithm, sizes, (grad_out, weight, no_bias),
                            run.empty(x.shape, x.dtype))
    grad_weight = _conv_pass(run, "weight_grad", algorithm, sizes, (grad_out, x),
                             run.empty(weight.shape, x.dtype))
    return grad_x, grad_weight, channel_sum(grad_out)


# A transposed convolution x (N, C, H, W) -> (N, K, P, Q) with weight (C, K, R, S) is the
# input gradient of the convolution K -> C with the same weight: that convolution's input is
# the transposed one's output and the other way round (ConvGeometry.in_hw / out_hw are set
# up that way, and ConvSizes of the convolution swap the letters accordingly).
# The U-Net's 2x2 stride-2 up-convolution has kernels of its own on the blocked rungs.


def _is_up_conv2x2(g: ConvGeometry) -> bool:
    """Kernel 2x2, stride 2, no padding, no dilation, no output padding."""
    return (g.kernel_size == (2, 2) and g.stride == (2, 2) and g.dilation == (1, 1)
            and g.padding == ((0, 0), (0, 0))
            and tuple(g.in_hw) == (2 * g.out_hw[0], 2 * g.out_hw[1]))


def _up_sizes(x, weight) -> tuple[np.int32, ...]:
    """N, C, H, W, K of an up-convolution x (N, C, H, W), weight (C, K, 2, 2)."""
    return tuple(_int(v, "an up-convolution size") for v in (*x.shape, weight.shape[1]))


def _uses_up_conv_kernels(geometry: ConvGeometry, algorithm: str) -> bool:
    _check_algorithm(algorithm)
    return algorithm in ("blocked", "pipelined") and _is_up_conv2x2(geometry)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                     *, algorithm=DEFAULT_ALGORITHM):
    """2-D transposed convolution on the GPU, as :func:`minunet.functional.conv_transpose2d`:
    x (N, C, H, W), weight (C, K, R, S), bias (K,) or None -> (N, K, P, Q) with
    ``P = (H-1)*stride - 2*padding + dilation*(R-1) + output_padding + 1``. One launch of the
    convolution's input-gradient kernel, with the bias added in it, or of
    up_conv2x2_forward for the U-Net's up-convolution."""
    geometry = conv_transpose2d_arguments(x, weight, bias, stride, padding, output_padding,
                                          dilation)
    _check_size(x, weight)
    run = gpu_runner()
    sizes = ConvSizes.of(x.shape[0], weight.shape[1], weight.shape[0], geometry)
    y = run.empty((x.shape[0], weight.shape[1], *geometry.in_hw), x.dtype)
    inputs = (run.contiguous(x), run.contiguous(weight),
              _bias_or_zeros(run, bias, weight.shape[1], x.dtype))
    if not _uses_up_conv_kernels(geometry, algorithm):
        return _conv_pass(run, "input_grad", algorithm, sizes, inputs, y)
    rows, cols = 4 * weight.shape[1], x.shape[0] * x.shape[2] * x.shape[3]
    if rows * cols:
        kernel = run.kernel("conv2d.cu", f"up_conv2x2_forward_{algorithm}", x.dtype)
        kernel(_blocked_grid(rows, cols), (BLOCKED_THREADS,), (*inputs, y, *_up_sizes(x, weight)))
    return y


def conv_transpose2d_backward(grad_out, x, weight, stride=1, padding=0, output_padding=0,
                              dilation=1, *, input_gradient=True, algorithm=DEFAULT_ALGORITHM):
    """Gradients of :func:`conv_transpose2d`: ``(grad_x, grad_weight, grad_bias)``, given
    grad_out (N, K, P, Q). grad_x is the forward convolution of grad_out (None with
    ``input_gradient=False``), grad_weight the convolution's weight gradient with the roles
    of x and grad_out swapped."""
    geometry = conv_transpose2d_arguments(x, weight, None, stride, padding, output_padding,
                                          dilation)
    check_grad_out(grad_out, (x.shape[0], weight.shape[1], *geometry.in_hw), x)
    _check_size(grad_out, x, weight)
    run = gpu_runner()
    sizes = ConvSizes.of(x.shape[0], weight.shape[1], weight.shape[0], geometry)
    grad_out, x, weight = run.contiguous(grad_out), run.contiguous(x), run.contiguous(weight)
    grad_x = run.empty(x.shape, x.dtype) if input_gradient else None
    grad_weight = run.empty(weight.shape, x.dtype)
    if _uses_up_conv_kernels(geometry, algorithm):
        N, C, H, W = x.shape  # the letters of conv2d.cu
        up = _up_sizes(x, weight)
        if input_gradient and N * H * W and C:
            kernel = run.kernel("conv2d.cu", f"up_conv2x2_input_grad_{algorithm}", x.dtype)
            kernel(_blocked_grid(C, N * H * W), (BLOCKED_THREADS,), (grad_out, weight, grad_x, *up))
        if grad_weight.size:
            kernel = run.kernel("conv2d.cu", f"up_conv2x2_weight_grad_{algorithm}", x.dtype)
            _split_k(run, kernel, C, 4 * weight.shape[1], N * H * W, (grad_out, x), grad_weight,
                     up)
    else:
        if input_gradient:
            no_bias = run.zeros((weight.shape[0],), x.dtype)
            _conv_pass(run, "forward", algorithm, sizes, (grad_out, weight, no_bias), grad_x)
        _conv_pass(run, "weight_grad", algorithm, sizes, (x, grad_out), grad_weight)
    return grad_x, grad_weight, channel_sum(grad_out)


# --- Max-pooling ----------------------------------------------------------------------------


def _pool_args(x, geometry: ConvGeometry) -> tuple[np.int32, ...]:
    """planes (N*C), H, W, P, Q, R, S, stride_h, stride_w, pad_h, pad_w: the sizes the kernels
    of max_pool2d.cu take (window R x S, output P x Q)."""
    (top, _), (left, _) = geometry.padding
    values = (x.shape[0] * x.shape[1], *geometry.in_hw, *geometry.out_hw,
              *geometry.kernel_size, *geometry.stride, top, left)
    return tuple(_int(v, "a max-pooling size") for v in values)


def _max_pool_forward(run, x, geometry: ConvGeometry):
    """``(y, argmax)``: the pooled maxima and the int32 flat position ``h*W + w`` of each."""
    out_shape = (*x.shape[:2], *geometry.out_hw)
    y, argmax = run.empty(out_shape, x.dtype), run.empty(out_shape, np.int32)
    kernel = run.kernel("max_pool2d.cu", "max_pool2d_forward", x.dtype)
    _launch_1d(kernel, y.size, (run.contiguous(x), y, argmax, *_pool_args(x, geometry)))
    return y, argmax


def max_pool2d(x, kernel_size, stride=None, padding=0, return_indices=False):
    """2-D max-pooling on the GPU, as :func:`minunet.functional.max_pool2d`:
    x (N, C, H, W) -> (N, C, P, Q), and the int64 flat indices ``h*W + w`` of the
    winners when ``return_indices`` (first maximum in row-major window order)."""
    geometry = max_pool2d_arguments(x, kernel_size, stride, padding)
    _check_size(x)
    y, argmax = _max_pool_forward(gpu_runner(), x, geometry)
    return (y, argmax.astype(np.int64)) if return_indices else y


def max_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0, indices=None):
    """Gradient of :func:`max_pool2d`: grad_out (N, C, P, Q) -> grad_x (N, C, H, W).

    Each input pixel gathers the gradients of the windows it won; without ``indices`` the
    winners are found again by the forward kernel."""
    geometry = max_pool2d_arguments(x, kernel_size, stride, padding)
    check_grad_out(grad_out, (*x.shape[:2], *geometry.out_hw), x)
    _check_size(x)
    run = gpu_runner()
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


def channel_sum(x):
    """``out[c] = sum_{n, pixels} x[n, c, ...]`` for x (N, C, ...) -> (C,): the bias gradient
    of a convolution. Deterministic (a fixed tree of additions, no atomics)."""
    _check_float("x", x, min_ndim=2)
    _check_size(x)
    run = gpu_runner()
    N, C = x.shape[:2]  # the letters of the .cu files
    HW = x.size // max(N * C, 1)
    out = run.empty((C,), x.dtype)
    if C:
        kernel = run.kernel("reduction.cu", "channel_sum", x.dtype)
        kernel((C,), (SUM_THREADS,),
               (run.contiguous(x), out, _int(N, "batch"), _int(C, "channels"),
                _int(HW, "pixels")))
    return out


def _check_like(reference_name: str, reference, **others) -> None:
    """Every array in ``others`` has the shape and dtype of ``reference``."""
    check_same_dtype(reference_name, reference, **others)
    for name, array in others.items():
        if tuple(array.shape) != tuple(reference.shape):
            raise ValueError(f"{name} must have the shape of {reference_name} "
                             f"{tuple(reference.shape)}, got {tuple(array.shape)}")


def _relu_forward(run, x, y=None):
    y = run.empty(x.shape, x.dtype) if y is None else y
    _launch_1d(run.kernel("elementwise.cu", "relu_forward", x.dtype), x.size,
               (run.contiguous(x), y, _int(x.size, "size")))
    return y


def relu(x, out=None):
    """``max(x, 0)`` elementwise, any shape, float32/float64: a new array, or ``out`` (a
    contiguous array of ``x``'s shape and dtype; ``x`` itself for an in-place ReLU)."""
    _check_float("x", x)
    _check_size(x)
    if out is not None:
        _check_like("out", x, out=out)
        if not out.flags.c_contiguous:
            raise ValueError("out must be a contiguous array")
    return _relu_forward(gpu_runner(), x, out)


def relu_backward(grad_out, x, out=None):
    """Gradient of :func:`relu`: ``grad_out`` where ``x > 0``, else 0 (also at 0), in a new
    array or in ``out`` (a contiguous array of ``x``'s shape and dtype; ``grad_out`` itself
    when the caller has no further use for it: each thread reads its element before it
    writes it)."""
    _check_float("x", x)
    _check_like("x", x, grad_out=grad_out)
    _check_size(x)
    if out is not None:
        _check_like("out", x, out=out)
        if not out.flags.c_contiguous:
            raise ValueError("out must be a contiguous array")
    run = gpu_runner()
    grad_x = run.empty(x.shape, x.dtype) if out is None else out
    _launch_1d(run.kernel("elementwise.cu", "relu_backward", x.dtype), x.size,
               (run.contiguous(grad_out), run.contiguous(x), grad_x, _int(x.size, "size")))
    return grad_x


def softmax_cross_entropy(logits, target, weight=None):
    """Pixel-wise weighted softmax cross-entropy and its gradient in one kernel, as
    :func:`minunet.losses.softmax_cross_entropy`: logits (N, K, H, W), target (N, H, W)
    integers in [0, K), weight (N, H, W) or None; with M = N*H*W,

        loss = (1/M) sum_pixels w * (-log softmax(logits)_target)
        grad = (1/M) w * (softmax(logits) - one_hot(target))

    Returns ``(loss, grad_logits)``, the loss a 0-d array of the logits' dtype. Labels on
    the GPU are not read here (that would wait for the GPU, once per training step): a label
    outside [0, K) makes its pixel's loss, and so the loss, NaN."""
    check_class_target(logits, target, values=not is_cupy_array(target))
    check_pixel_weight(weight, target.shape)
    check_same_dtype("logits", logits, weight=weight)
    _check_size(logits)
    run = gpu_runner()
    N, K = logits.shape[:2]
    HW = target.size // max(N, 1)
    if weight is None:
        weight = run.xp.ones(target.shape, dtype=logits.dtype)
    pixel_loss = run.empty((N, 1, HW), logits.dtype)
    grad = run.empty(logits.shape, logits.dtype)
    scale = logits.dtype.type(1.0 / max(target.size, 1))
    kernel = run.kernel("softmax_cross_entropy.cu", "softmax_cross_entropy", logits.dtype)
    _launch_1d(kernel, target.size,
               (run.contiguous(logits), run.contiguous(target.astype(np.int32)),
                run.contiguous(weight), pixel_loss, grad, _int(N, "batch"),
                _int(K, "classes"), _int(HW, "pixels"), scale))
    return channel_sum(pixel_loss).reshape(()), grad


# --- Optimiser updates (in place) -----------------------------------------------------------


def _check_in_place(param, **state) -> None:
    """``param`` and its state: same shape and float dtype, C-contiguous (updated in place)."""
    _check_float("param", param)
    _check_like("param", param, **state)
    for name, array in {"param": param, **state}.items():
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous: it is updated in place")
    _check_size(param)


def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay=0.0):
    """One SGD-with-momentum step, IN PLACE on ``param`` and ``velocity`` (PyTorch's rule, as
    :class:`minunet.optim.SGD`): ``g = grad + weight_decay*param``,
    ``velocity = momentum*velocity + g``, ``param -= lr*velocity``. Returns None."""
    _check_in_place(param, grad=grad, velocity=velocity)
    run = gpu_runner()
    t = param.dtype.type
    _launch_1d(run.kernel("optimizers.cu", "sgd_momentum_update", param.dtype), param.size,
               (param, run.contiguous(grad), velocity, _int(param.size, "size"), t(lr),
                t(momentum), t(weight_decay)))


def adam_update(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0):
    """One Adam step number ``step`` (1, 2, ...), IN PLACE on ``param``, ``m`` and ``v``
    (PyTorch's rule, as :class:`minunet.optim.Adam`)::

        g = grad + weight_decay*param;  m = beta1*m + (1-beta1)*g;  v = beta2*v + (1-beta2)*g^2
        param -= lr/(1 - beta1**step) * m / (sqrt(v)/sqrt(1 - beta2**step) + eps)

    Returns None."""
    _check_in_place(param, grad=grad, m=m, v=v)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step!r}")
    run = gpu_runner()
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
