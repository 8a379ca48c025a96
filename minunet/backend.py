"""Choosing NumPy or CuPy from the arrays themselves.

minunet never keeps a global "device" switch: every function looks at the arrays it is given
and asks this module which array library they belong to. CuPy is optional; without it every
array is a NumPy array and nothing here imports CuPy.
"""

from __future__ import annotations

import importlib
import os
import types
from pathlib import Path

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


def _meminfo_bytes(path: str, field: str) -> int | None:
    """A ``field: N kB`` line of a /proc status file, in bytes (None if absent)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup (v2) may still allocate, if it has a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_memory_bytes(device: str = "numpy") -> int | None:
    """Bytes a new allocation can take now, or ``None`` where it cannot be known.

    ``"numpy"``: the smallest of the host's available memory (``MemAvailable``), the room
    left under a cgroup limit, and the room left under ``ulimit -v`` (``RLIMIT_AS``).
    ``"cupy"``: the GPU's free memory.
    """
    if device in ("cupy", "gpu", "cuda"):
        return int(require_cupy().cuda.Device().mem_info[0])
    candidates = [_meminfo_bytes("/proc/meminfo", "MemAvailable"), _cgroup_room()]
    import resource  # POSIX only, like /proc

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        in_use = _meminfo_bytes("/proc/self/status", "VmSize") or 0
        candidates.append(max(soft - in_use, 0))
    if os.name == "posix" and candidates[0] is None:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    known = [c for c in candidates if c is not None]
    return min(known) if known else None
