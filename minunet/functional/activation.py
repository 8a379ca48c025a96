"""The rectified linear unit ``max(x, 0)`` and its gradient.

Like every kernel of this package, both forward CuPy arrays to :mod:`minunet.cuda.ops`
(``elementwise.cu``), so a U-Net on the GPU runs its activations as CUDA C too.
"""

from __future__ import annotations

import numpy as np

from minunet.functional._dispatch import dispatch_on_array_type


@dispatch_on_array_type
def relu(x):
    """``max(x, 0)`` elementwise, any shape; a new array of ``x``'s dtype."""
    return np.maximum(x, 0)


@dispatch_on_array_type
def relu_backward(grad_out, x):
    """``grad_out`` where ``x > 0``, else 0 (the derivative at 0 is taken as 0, as in
    PyTorch). ``x`` may be the ReLU's input or its output: both are positive at the same
    places, so a layer can keep the output it has anyway instead of a mask."""
    return np.where(x > 0, grad_out, 0).astype(grad_out.dtype, copy=False)
