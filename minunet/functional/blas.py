"""Matrix products through BLAS's own interface, the one NumPy's ``@`` hides.

``np.matmul(a, b, out=c)`` always *overwrites* ``c`` and wants compact operands. The BLAS
routine behind it, ``gemm``, computes ``C = alpha * op(A) @ op(B) + beta * C`` on matrices
given by a pointer and a *leading dimension* (the distance between rows), so it can

* accumulate (``beta = 1``): a sum of products needs no temporary array and no extra pass;
* read a matrix that is a window of a larger array: rows ``r`` of width ``n`` starting at
  any element, whatever the row stride, which is how a shifted view of a flattened image
  enters a product without a copy (:mod:`minunet.functional.conv`);
* read a transposed view as it is (``op = transpose``) instead of copying it.

:func:`gemm` calls the ``cblas_?gemm`` of the OpenBLAS that NumPy itself loaded, through
:mod:`ctypes`, so it obeys the same thread limits (``threadpoolctl``). Where that library or
the operands do not allow it (another BLAS, a non-float dtype, a view with no contiguous
axis, operands that overlap the output), it computes the same numbers with NumPy.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np

from minunet.functional.process import HeldSetting

_ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE = 101, 111, 112  # CBLAS enumeration values


def _load_numpy_openblas() -> tuple[dict, dict]:
    """From the OpenBLAS bundled with NumPy's wheels (64-bit integers, symbols prefixed
    ``scipy_``): ``{dtype: cblas_?gemm}`` and ``{"get": ..., "set": ...}``, its thread-count
    functions. Both empty if there is none (e.g. a NumPy built on MKL or Accelerate), in
    which case :func:`gemm` uses NumPy and the thread count is not known."""
    numpy_dir = os.path.dirname(np.__file__)
    paths = sorted(glob.glob(os.path.join(numpy_dir, os.pardir, "numpy.libs", "*openblas64*"))
                   + glob.glob(os.path.join(numpy_dir, ".dylibs", "*openblas64*")))
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        functions = {}
        for dtype, scalar, name in ((np.float32, ctypes.c_float, "scipy_cblas_sgemm64_"),
                                    (np.float64, ctypes.c_double, "scipy_cblas_dgemm64_")):
            function = getattr(library, name, None)
            if function is None:
                break
            size, pointer = ctypes.c_int64, ctypes.c_void_p
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, size, size, size,
                                 scalar, pointer, size, pointer, size, scalar, pointer, size]
            function.restype = None
            functions[np.dtype(dtype)] = function
        else:
            get = getattr(library, "scipy_openblas_get_num_threads64_", None)
            set_ = getattr(library, "scipy_openblas_set_num_threads64_", None)
            if get is None or set_ is None:
                return functions, {}
            get.argtypes, get.restype = [], ctypes.c_int
            set_.argtypes, set_.restype = [ctypes.c_int], None
            return functions, {"get": get, "set": set_}
    return {}, {}


_GEMM, _THREADS = _load_numpy_openblas()
_ONE_THREAD = HeldSetting(_THREADS["get"], _THREADS["set"], 1) if _THREADS else None


def blas_threads() -> int:
    """How many threads NumPy's OpenBLAS runs a product on (1 where that is not known)."""
    return _THREADS["get"]() if _THREADS else 1


@contextlib.contextmanager
def single_threaded_blas():
    """Within the block every BLAS product runs on the thread that asks for it, the way to
    run several products at once from several threads. The count is OpenBLAS's own, for the
    whole process (its per-thread setting does not hold in NumPy's build); it is restored
    when the last block still open ends."""
    if _ONE_THREAD is None:
        yield
        return
    with _ONE_THREAD.held():
        yield


def direct_gemm_available() -> bool:
    """Whether :func:`gemm` reaches BLAS directly (else it computes with NumPy)."""
    return bool(_GEMM)


def _blas_operand(matrix, itemsize: int):
    """``(transpose flag, leading dimension)`` of a 2-D view for row-major CBLAS, or None
    when neither axis is contiguous."""
    rows, cols = matrix.strides
    if cols == itemsize and rows >= itemsize * max(matrix.shape[1], 1) and rows % itemsize == 0:
        return _NO_TRANSPOSE, rows // itemsize
    if rows == itemsize and cols >= itemsize * max(matrix.shape[0], 1) and cols % itemsize == 0:
        return _TRANSPOSE, cols // itemsize
    return None


def _numpy_gemm(a, b, out, accumulate: bool) -> None:
    if accumulate:
        out += a @ b
    else:
        np.matmul(a, b, out=out)


def gemm(a, b, out, *, accumulate: bool = False) -> None:
    """``out = a @ b``, or ``out += a @ b`` with ``accumulate``, in place.

    ``a`` (M, K), ``b`` (K, N) and ``out`` (M, N): 2-D NumPy arrays of one float dtype,
    views allowed: any row stride, and ``a`` or ``b`` may be transposed views. ``out`` must
    not overlap ``a`` or ``b``.
    """
    (m, k), (k_b, n) = a.shape, b.shape
    if k != k_b or out.shape != (m, n):
        raise ValueError(f"gemm: cannot multiply {a.shape} by {b.shape} into {out.shape}")
    function = _GEMM.get(out.dtype) if a.dtype == b.dtype == out.dtype else None
    itemsize = out.dtype.itemsize
    layouts = [_blas_operand(matrix, itemsize) for matrix in (a, b, out)]
    if (function is None or None in layouts or layouts[2][0] != _NO_TRANSPOSE or 0 in (m, n, k)
            or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        _numpy_gemm(a, b, out, accumulate)
        return
    (trans_a, lda), (trans_b, ldb), (_, ldc) = layouts
    function(_ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a.ctypes.data, lda,
             b.ctypes.data, ldb, 1.0 if accumulate else 0.0, out.ctypes.data, ldc)
