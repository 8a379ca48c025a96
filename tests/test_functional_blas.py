"""minunet.functional.blas.gemm: BLAS's own interface (windows, transposed views,
accumulation) against NumPy's matmul, and its NumPy fallback."""

from __future__ import annotations

import numpy as np
import pytest

from minunet.functional import blas


def operand(rng, shape, dtype, *, transposed, window):
    """A (rows, cols) matrix as gemm may receive it: a transposed view and/or a window of a
    wider array (a row stride larger than the row)."""
    stored = shape[::-1] if transposed else shape
    wide = rng.standard_normal((stored[0], stored[1] + window)).astype(dtype)
    view = wide[:, window:]
    return view.T if transposed else view


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("backend", ["blas", "numpy"])
def test_gemm_matches_matmul(dtype, transpose_a, transpose_b, accumulate, backend, monkeypatch):
    if backend == "numpy":
        monkeypatch.setattr(blas, "_GEMM", {})
    rng = np.random.default_rng(3)
    a = operand(rng, (7, 5), dtype, transposed=transpose_a, window=3)
    b = operand(rng, (5, 9), dtype, transposed=transpose_b, window=2)
    out_wide = rng.standard_normal((7, 13)).astype(dtype)
    out = out_wide[:, 2:11]  # a window: row stride 13
    expected = (out.astype(np.float64) if accumulate else 0) + a.astype(np.float64) @ b
    before = out_wide.copy()
    blas.gemm(a, b, out, accumulate=accumulate)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * 10)
    outside = np.ones_like(out_wide, bool)
    outside[:, 2:11] = False
    np.testing.assert_array_equal(out_wide[outside], before[outside])  # nothing else written


def test_numpy_wheels_reach_blas_directly():
    """NumPy's wheels bundle OpenBLAS: the direct route must be found there, or the
    convolutions silently lose their speed."""
    if "openblas" not in str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]).lower():
        pytest.skip("this NumPy is not built on OpenBLAS")
    assert blas.direct_gemm_available()


def test_gemm_falls_back_for_overlap_and_odd_strides():
    rng = np.random.default_rng(4)
    square = rng.standard_normal((6, 6))
    expected = square @ square
    blas.gemm(square, square, square)  # out is an operand: NumPy buffers it
    np.testing.assert_allclose(square, expected, rtol=1e-12)
    a = rng.standard_normal((4, 10))[:, ::2]  # no contiguous axis
    b = rng.standard_normal((5, 3))
    out = np.empty((4, 3))
    blas.gemm(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)


def test_gemm_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="cannot multiply"):
        blas.gemm(np.zeros((2, 3)), np.zeros((4, 2)), np.zeros((2, 2)))

