"""The kernels of minunet: convolution, transposed convolution, max-pooling and ReLU, with
their gradients, in NumPy.

Every operation comes twice: a loop-only ``*_reference`` version that reads like its
equation, and a fast vectorised version (im2col + one matrix product) tested against it and
against PyTorch. The fast versions forward CuPy arrays to :mod:`minunet.cuda.ops`.

Conventions are PyTorch's: NCHW arrays, conv weight (C_out, C_in, kH, kW), transposed-conv
weight (C_in, C_out, kH, kW), ``dilation=1`` meaning none; float32 or float64, and the
output has the dtype of the input.
"""

from minunet.functional.activation import relu, relu_backward
from minunet.functional.conv import (
    conv2d,
    conv2d_backward,
    conv2d_backward_reference,
    conv2d_reference,
)
from minunet.functional.conv_transpose import (
    conv_transpose2d,
    conv_transpose2d_backward,
    conv_transpose2d_backward_reference,
    conv_transpose2d_reference,
)
from minunet.functional.im2col import col2im, im2col
from minunet.functional.pool import (
    max_pool2d,
    max_pool2d_backward,
    max_pool2d_backward_reference,
    max_pool2d_reference,
)
from minunet.functional.signal2d import (
    convolve2d,
    convolve2d_reference,
    correlate2d,
    correlate2d_reference,
)

__all__ = [
    "col2im",
    "conv2d",
    "conv2d_backward",
    "conv2d_backward_reference",
    "conv2d_reference",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "conv_transpose2d_backward_reference",
    "conv_transpose2d_reference",
    "convolve2d",
    "convolve2d_reference",
    "correlate2d",
    "correlate2d_reference",
    "im2col",
    "max_pool2d",
    "max_pool2d_backward",
    "max_pool2d_backward_reference",
    "max_pool2d_reference",
    "relu",
    "relu_backward",
]
