"""Bad arguments raise a ValueError/TypeError that names the argument, in fast and reference
kernels alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import minunet.functional as mf

X = np.zeros((2, 3, 8, 8))
W = np.zeros((4, 3, 3, 3))  # conv2d: (C_out, C_in, kH, kW)
WT = np.zeros((3, 4, 2, 2))  # conv_transpose2d: (C_in, C_out, kH, kW)
G = np.zeros((2, 4, 6, 6))  # grad_out of conv2d(X, W)
GT = np.zeros((2, 4, 16, 16))  # grad_out of conv_transpose2d(X, WT, stride=2)
GP = np.zeros((2, 3, 4, 4))  # grad_out of max_pool2d(X, 2)

CONV = [mf.conv2d, mf.conv2d_reference]
CONV_BACKWARD = [mf.conv2d_backward, mf.conv2d_backward_reference]
TRANSPOSE = [mf.conv_transpose2d, mf.conv_transpose2d_reference]
TRANSPOSE_BACKWARD = [mf.conv_transpose2d_backward, mf.conv_transpose2d_backward_reference]
POOL = [mf.max_pool2d, mf.max_pool2d_reference]
POOL_BACKWARD = [mf.max_pool2d_backward, mf.max_pool2d_backward_reference]
SIGNAL = [mf.convolve2d, mf.convolve2d_reference, mf.correlate2d, mf.correlate2d_reference]

CASES = [
    # (functions, args, kwargs, error, message pattern)
    (CONV, (X[0], W), {}, ValueError, r"x must be a 4-D array \(N, C_in, H, W\)"),
    (CONV, (X, W[0]), {}, ValueError, r"weight must be a 4-D array"),
    (CONV, (X.tolist(), W), {}, TypeError, r"x must be a NumPy or CuPy array"),
    (CONV, (X, W[:, :2]), {}, ValueError, r"weight expects 2 input channels.*x has 3"),
    (CONV, (X, W, np.zeros(5)), {}, ValueError, r"bias must have one value per output channel"),
    (CONV, (X, W, np.zeros((4, 1))), {}, ValueError, r"bias must be a 1-D array"),
    (CONV, (X, W), {"stride": 0}, ValueError, r"stride must be positive"),
    (CONV, (X, W), {"stride": 1.5}, TypeError, r"stride must be an int or a pair"),
    (CONV, (X, W), {"dilation": (1, 0)}, ValueError, r"dilation must be positive"),
    (CONV, (X, W), {"padding": -1}, ValueError, r"padding must be >= 0"),
    (CONV, (X, W), {"padding": "half"}, ValueError, r"padding must be .*'same'"),
    (CONV, (X, W), {"padding": "same", "stride": 2}, ValueError, r"padding='same' needs stride 1"),
    (CONV, (X, W), {"dilation": 4}, ValueError, r"kernel .* larger than the padded input"),
    (CONV, (X[:, :, :2], W), {}, ValueError, r"larger than the padded input \(2, 8\)"),
    (CONV, (X.astype(np.int64), W), {}, TypeError, r"x must have dtype float32 or float64"),
    (CONV, (X, W.astype(bool)), {}, TypeError, r"weight must have dtype float32 or float64"),
    (CONV, (X.astype(complex), W), {}, TypeError, r"x must have dtype float32 or float64"),
    (CONV, (X.astype(np.float16), W), {}, TypeError, r"x must have dtype float32 or float64"),
    (CONV, (X, W.astype(np.longdouble)), {}, TypeError, r"weight must have dtype float32 or"),
    (CONV, (X, W.astype(np.float32)), {}, TypeError, r"weight has dtype float32 but x .*float64"),
    (CONV, (X, W, np.zeros(4, np.float32)), {}, TypeError, r"bias has dtype float32"),
    (CONV_BACKWARD, (G[:, :, :5], X, W), {}, ValueError, r"grad_out must have the shape .*6, 6"),
    (CONV_BACKWARD, (G.astype(np.float32), X, W), {}, TypeError, r"grad_out has dtype float32"),
    (CONV_BACKWARD, (G, X, W), {"stride": -1}, ValueError, r"stride must be positive"),
    (TRANSPOSE, (X, WT[:2]), {}, ValueError, r"weight expects 2 input channels.*x has 3"),
    (TRANSPOSE, (X, WT, np.zeros(3)), {}, ValueError, r"bias must have one value"),
    (TRANSPOSE, (X, WT), {"stride": 2, "output_padding": 2}, ValueError,
     r"output_padding must be smaller than stride or dilation"),
    (TRANSPOSE, (X, WT), {"output_padding": 1}, ValueError, r"output_padding must be smaller"),
    (TRANSPOSE, (X, WT), {"padding": "same"}, TypeError, r"padding must be an int or a pair"),
    (TRANSPOSE, (X, WT), {"padding": 5}, ValueError, r"padding=\(5, 5\) removes the whole"),
    (TRANSPOSE, (X, WT), {"dilation": 0}, ValueError, r"dilation must be positive"),
    (TRANSPOSE, (X, WT.astype(np.float32)), {}, TypeError, r"weight has dtype float32"),
    (TRANSPOSE_BACKWARD, (GT, X, WT), {}, ValueError, r"grad_out must have the shape"),
    (POOL, (X[0], 2), {}, ValueError, r"x must be a 4-D array \(N, C, H, W\)"),
    (POOL, (X, 0), {}, ValueError, r"kernel_size must be positive"),
    (POOL, (X, 2), {"stride": 0}, ValueError, r"stride must be positive"),
    (POOL, (X, 2), {"padding": 2}, ValueError, r"padding must be at most half the kernel size"),
    (POOL, (X, 9), {}, ValueError, r"kernel_size .* larger than the padded input"),
    (POOL, (X.astype(np.int32), 2), {}, TypeError, r"x must have dtype float32 or float64"),
    (POOL_BACKWARD, (GP[:, :, :3], X, 2), {}, ValueError, r"grad_out must have the shape"),
    (SIGNAL, (X[0, 0], W[0, 0]), {"mode": "circular"}, ValueError, r"mode must be 'full'"),
    (SIGNAL, (X[0], W[0, 0]), {}, ValueError, r"image must be a 2-D array"),
    (SIGNAL, (X[0, 0], W[0]), {}, ValueError, r"kernel must be a 2-D array"),
    (SIGNAL, (X[0, 0, :3], np.zeros((4, 2))), {"mode": "valid"}, ValueError,
     r"mode='valid' needs the image to be at least as large as the kernel"),
    (SIGNAL, (X[0, 0], W[0, 0].astype(np.float32)), {}, TypeError, r"kernel has dtype float32"),
]


@pytest.mark.parametrize(
    ("function", "args", "kwargs", "error", "pattern"),
    [
        pytest.param(f, args, kwargs, error, pattern, id=f"{f.__name__}-{pattern[:30]}")
        for functions, args, kwargs, error, pattern in CASES
        for f in functions
    ],
)
def test_bad_arguments_are_named(function, args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        function(*args, **kwargs)


def test_saved_indices_must_match_grad_out():
    _, indices = mf.max_pool2d(X, 2, return_indices=True)
    with pytest.raises(ValueError, match="indices must be the integer array"):
        mf.max_pool2d_backward(GP, X, 2, indices=indices[:, :, :3])
    with pytest.raises(ValueError, match="indices must be the integer array"):
        mf.max_pool2d_backward(GP, X, 2, indices=indices.astype(np.float64))


EMPTY = [  # (x channels, weight shape): no output channels, no input channels, a 0x0 kernel
    (3, (0, 3, 3, 3)), (0, (4, 0, 3, 3)), (3, (4, 3, 0, 0)), (3, (4, 3, 2, 0)),
]


@pytest.mark.parametrize("channels, shape", EMPTY)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_weights_without_elements_are_refused_by_name(channels, shape, transposed):
    """These used to end in a ZeroDivisionError or a reshape error. PyTorch refuses them
    too, except zero input channels, where it returns an empty result of a wrong shape."""
    if transposed:  # the transposed weight is (C_in, C_out, kH, kW)
        shape = (shape[1], shape[0], *shape[2:])
        functions = TRANSPOSE + TRANSPOSE_BACKWARD
        torch_function = torch.nn.functional.conv_transpose2d
    else:
        functions = CONV + CONV_BACKWARD
        torch_function = torch.nn.functional.conv2d
    x, weight = np.zeros((2, channels, 8, 8)), np.zeros(shape)
    if channels:
        with pytest.raises(RuntimeError):
            torch_function(torch.from_numpy(x), torch.from_numpy(weight))
    for function in functions:
        args = (x, weight) if function in (*CONV, *TRANSPOSE) else (np.zeros((2, 1, 1, 1)), x,
                                                                   weight)
        with pytest.raises(ValueError, match="weight must have at least one element"):
            function(*args)
