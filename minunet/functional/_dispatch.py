"""Sending CuPy arrays to the CUDA kernels.

Every public kernel in :mod:`minunet.functional` is written for NumPy. Decorating it with
:func:`dispatch_on_array_type` makes it forward CuPy arrays to the function of the same
name in :mod:`minunet.cuda.ops`, with the same arguments; NumPy arrays run the NumPy code.
(Importing :mod:`minunet.cuda.ops` needs no CuPy: only launching a kernel does.)
"""

from __future__ import annotations

import functools

import numpy as np

from minunet.backend import get_array_module
from minunet.cuda import ops


def dispatch_on_array_type(function):
    """Run ``function`` on NumPy arrays, ``minunet.cuda.ops.<function name>`` on CuPy arrays."""
    name = function.__name__
    if not callable(getattr(ops, name, None)):
        raise AttributeError(f"minunet.cuda.ops has no {name}, the GPU twin of {name}")

    @functools.wraps(function)
    def dispatched(*args, **kwargs):
        arrays = [a for a in (*args, *kwargs.values()) if hasattr(a, "shape")]
        if get_array_module(*arrays) is np:
            return function(*args, **kwargs)
        return getattr(ops, name)(*args, **kwargs)

    return dispatched
