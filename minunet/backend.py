"""Choosing NumPy or CuPy from the arrays themselves.

minunet never keeps a global "device" switch: every function looks at the arrays it is given
and asks this module which array library they belong to. CuPy is optional; without it every
array is a NumPy array and nothing here imports CuPy.
"""

from __future__ import annotations

import importlib
import types

import numpy as np

_cupy: types.ModuleType | None | bool = False  # False: not looked for yet; None: unavailable


def cupy_module() -> types.ModuleType | None:
    """Return the ``cupy`` module if it is installed, else ``None`` (looked up once)."""
    global _cupy
    if _cupy is False:
        try:
            _cupy = importlib.import_module("cupy")
        except Exception:  # ImportError, or a broken CUDA install raising at import
            _cupy = None
    return _cupy


def is_cupy_array(x) -> bool:
    """True when ``x`` is a CuPy array (without importing CuPy if it was never imported)."""
    return type(x).__module__.startswith("cupy")


def get_array_module(*arrays) -> types.ModuleType:
    """The array library (``numpy`` or ``cupy``) that the given arrays live in.

    Mixing a CuPy array with a NumPy array is an error: it would force a silent copy between
    host and device.
    """
    on_gpu = [is_cupy_array(a) for a in arrays if a is not None and hasattr(a, "shape")]
    if any(on_gpu):
        if not all(on_gpu):
            raise TypeError(
                "arrays must all be NumPy arrays or all CuPy arrays; got a mix of both "
                "(move them with minunet.backend.to_device first)"
            )
        return cupy_module()
    return np


def require_cupy() -> types.ModuleType:
    """Return ``cupy``, or raise a clear error that says what is missing."""
    cp = cupy_module()
    if cp is None:
        raise RuntimeError(
            "the GPU backend needs CuPy: install it with `pip install -r requirements-gpu.txt` "
            "(cupy-cuda13x) on a machine with an NVIDIA GPU and driver"
        )
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise RuntimeError(f"CuPy is installed but no usable NVIDIA GPU was found ({exc})") from exc
    if count < 1:
        raise RuntimeError("CuPy is installed but no NVIDIA GPU was found")
    return cp


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        require_cupy()
    except RuntimeError:
        return False
    return True


def to_device(x, device: str):
    """Copy an array to ``"numpy"`` (host) or ``"cupy"`` (GPU); a no-op when already there."""
    if device in ("numpy", "cpu"):
        return x.get() if is_cupy_array(x) else np.asarray(x)
    if device in ("cupy", "gpu", "cuda"):
        cp = require_cupy()
        return x if is_cupy_array(x) else cp.asarray(x)
    raise ValueError(f"device must be 'numpy'/'cpu' or 'cupy'/'gpu', got {device!r}")


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of ``x``, wherever it lives."""
    return to_device(x, "numpy")
