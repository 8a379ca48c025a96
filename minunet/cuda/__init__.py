"""Hand-written CUDA C kernels and their CuPy launchers.

The kernels live next to this file as plain ``.cu`` sources (see :data:`KERNEL_FILES`), so
that they can be read, quoted and compiled on their own. :mod:`minunet.cuda.ops` launches
them on CuPy arrays (``import minunet.cuda.ops`` needs nothing; calling an op needs CuPy and
a GPU). :mod:`minunet.cuda.nvrtc` compiles them without a GPU, which the tests do for every
file, and :mod:`minunet.cuda.emulator` runs them on the CPU through a small emulation of
the CUDA execution model.

Each file is compiled once per element type: the host defines ``MINUNET_SCALAR`` as
``float`` or ``double`` (:func:`compile_options`), and every kernel has an ``extern "C"``
name, so that the same name works for both.
"""

from __future__ import annotations

import re
from importlib import resources

import numpy as np

#: The kernel sources, in the order a reader meets them.
KERNEL_FILES = (
    "elementwise.cu",  # ReLU and its gradient: one thread per element
    "conv2d.cu",  # convolution passes on four rungs (naive ... pipelined); the up-convolution
    "max_pool2d.cu",  # max-pooling forward (saving the argmax) and backward
    "reduction.cu",  # per-channel sums with a shared-memory tree (bias gradient, loss total)
    "softmax_cross_entropy.cu",  # the U-Net's weighted pixel-wise loss and its gradient
    "optimizers.cu",  # SGD with momentum and Adam
)

_KERNEL_NAME = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')

SCALAR_TYPES = {"float32": "float", "float64": "double"}


def source(name: str) -> str:
    """The text of the kernel file ``name`` (one of :data:`KERNEL_FILES`)."""
    if name not in KERNEL_FILES:
        raise ValueError(f"unknown kernel file {name!r}; expected one of {KERNEL_FILES}")
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def find_kernel_names(text: str) -> list[str]:
    """The ``extern "C" __global__`` kernels defined in CUDA source ``text``, in order."""
    return _KERNEL_NAME.findall(text)


def kernel_names(name: str) -> list[str]:
    """The kernels defined in the kernel file ``name`` (one of :data:`KERNEL_FILES`)."""
    return find_kernel_names(source(name))


def defined_constant(name: str, macro: str) -> int:
    """The integer value of ``#define macro <int>`` in the kernel file ``name``, so that the
    host code launches blocks of the size the kernel was written for."""
    found = re.search(rf"^#define\s+{macro}\s+(\d+)\s*$", source(name), re.MULTILINE)
    if found is None:
        raise LookupError(f"{name} has no '#define {macro} <integer>'")
    return int(found.group(1))


def scalar_type(dtype) -> str:
    """The C type (``"float"`` or ``"double"``) of a NumPy/CuPy float dtype."""
    name = np.dtype(dtype).name
    if name not in SCALAR_TYPES:
        raise TypeError(f"the CUDA kernels take float32 or float64 arrays, got dtype {name}")
    return SCALAR_TYPES[name]


def compile_options(dtype) -> tuple[str, ...]:
    """NVRTC options for compiling a kernel file for arrays of ``dtype``.

    No language standard is forced: the sources are plain C++11, which every NVRTC accepts
    (and whatever standard CuPy may add works).
    """
    return (f"-DMINUNET_SCALAR={scalar_type(dtype)}",)


__all__ = ["KERNEL_FILES", "SCALAR_TYPES", "compile_options", "defined_constant",
           "find_kernel_names", "kernel_names", "scalar_type", "source"]
