"""The CPU emulation of CUDA (:mod:`minunet.cuda.emulator`) catches what a GPU would get wrong.

If the emulation were too forgiving, the kernel tests in ``test_cuda_kernels.py`` would pass
for kernels that fail on a GPU. These tests feed it broken kernels and check that it notices:
a missing ``__syncthreads()``, a barrier inside a branch, a write past an array, an argument
of the wrong C type, and a launch configuration a GPU refuses.
"""

from __future__ import annotations

import numpy as np
import pytest

from minunet import cuda
from minunet import functional as F
from minunet.cuda import ops
from minunet.cuda.emulator import EmulatedRunner, EmulationError, compiler

pytestmark = pytest.mark.skipif(
    compiler() is None, reason="the CPU emulation of the CUDA kernels needs g++"
)


@pytest.fixture(scope="module")
def runner_without_barriers(tmp_path_factory):
    """The kernels that need __syncthreads(), compiled with every barrier removed."""
    sources = {file: cuda.source(file) for file in ("conv2d.cu", "reduction.cu")}
    return EmulatedRunner(tmp_path_factory.mktemp("cuda_emu_omit_sync"),
                          defines=("MINUNET_OMIT_SYNC",), sources=sources)


@pytest.fixture
def without_barriers(runner_without_barriers, monkeypatch):
    """:mod:`minunet.cuda.ops` launches the barrier-free kernels in this test."""
    monkeypatch.setattr(ops, "gpu_runner", lambda: runner_without_barriers)


def test_a_missing_barrier_breaks_the_tiled_convolution(without_barriers, rng):
    x, weight = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((18, 3, 3, 3))
    bias = rng.standard_normal(18)
    expected = F.conv2d(x, weight, bias, padding=1)
    # The naive kernel has no barrier to lose: still right ...
    naive = ops.conv2d(x, weight, bias, padding=1, algorithm="naive")
    np.testing.assert_allclose(naive, expected, rtol=1e-12, atol=1e-12)
    # ... the tiled kernel reads tiles before the other threads have filled them: wrong.
    tiled = ops.conv2d(x, weight, bias, padding=1, algorithm="tiled")
    assert not np.allclose(tiled, expected)


@pytest.mark.parametrize("rung", ["blocked", "pipelined"])
def test_a_missing_barrier_breaks_the_register_blocked_kernels(without_barriers, rung, rng):
    x, weight = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((5, 3, 3, 3))
    y = ops.conv2d(x, weight, padding=1, algorithm=rung)
    assert not np.allclose(y, F.conv2d(x, weight, padding=1))
    grad_weight = ops.conv2d_backward(y, x, weight, padding=1, algorithm=rung)[1]
    assert not np.allclose(grad_weight, F.conv2d_backward(y, x, weight, padding=1)[1])
    up_weight = weight[:3, :2, :2, :2].copy()  # (C_in, C_out, 2, 2): the up-convolution kernel
    up = ops.conv_transpose2d(x, up_weight, stride=2, algorithm=rung)
    assert not np.allclose(up, F.conv_transpose2d(x, up_weight, stride=2))


def test_a_missing_barrier_breaks_the_tree_reduction(without_barriers, rng):
    x = rng.standard_normal((2, 4, 300))
    total = ops.channel_sum(x)
    assert not np.allclose(total, x.sum(axis=(0, 2)))


FAULTY = r"""
typedef MINUNET_SCALAR scalar_t;

// Thread 0 leaves early; the others wait at a barrier it never reaches (undefined on a GPU).
extern "C" __global__ void barrier_in_a_branch(scalar_t* y) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    y[threadIdx.x] = 1;
}

// Each thread copies its left neighbour's value, but nobody waits for it to be written.
extern "C" __global__ void shift_without_barrier(const scalar_t* x, scalar_t* y) {
    __shared__ scalar_t tile[32];
    int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    tile[t] = x[i];
    y[i] = t > 0 ? tile[t - 1] : 0;  // a __syncthreads() is missing before this line
}

// Off by one: the last thread writes one element past the end.
extern "C" __global__ void write_past_the_end(scalar_t* y, int size) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= size) y[i] = 0;
}
"""


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return EmulatedRunner(tmp_path_factory.mktemp("cuda_emu_faulty"),
                          sources={"faulty.cu": FAULTY})


def test_a_barrier_not_reached_by_every_thread_is_reported(faulty):
    kernel = faulty.kernel("faulty.cu", "barrier_in_a_branch", np.float64)
    y = faulty.zeros((32,), np.float64)
    with pytest.raises(EmulationError, match=r"__syncthreads\(\) reached by 31 of the 32"):
        kernel((1,), (32,), (y,))


def test_a_missing_barrier_is_caught_whichever_thread_it_favours(faulty):
    """Run in increasing order, each thread of shift_without_barrier finds its left neighbour
    already written; the next block runs its threads in decreasing order and does not."""
    kernel = faulty.kernel("faulty.cu", "shift_without_barrier", np.float64)
    x = faulty.contiguous(np.arange(64.0))
    y = faulty.empty((64,), np.float64)
    kernel((2,), (32,), (x, y))
    expected = np.where(np.arange(64) % 32 > 0, np.arange(64.0) - 1, 0)
    np.testing.assert_array_equal(y[:32], expected[:32])  # the lucky order
    assert not np.array_equal(y[32:], expected[32:])  # the unlucky one


def test_a_write_past_an_array_is_reported(faulty):
    kernel = faulty.kernel("faulty.cu", "write_past_the_end", np.float64)
    y = faulty.empty((10,), np.float64)
    with pytest.raises(EmulationError, match="wrote outside an array"):
        kernel((1,), (32,), (y, np.int32(10)))


def test_arguments_must_have_the_kernels_c_types(faulty):
    kernel = faulty.kernel("faulty.cu", "write_past_the_end", np.float64)
    y = faulty.empty((10,), np.float64)
    with pytest.raises(EmulationError, match="numpy.int32, got int"):
        kernel((1,), (32,), (y, 9))  # CuPy would pass a Python int as 64 bits
    with pytest.raises(EmulationError, match="C-contiguous array"):
        kernel((1,), (32,), (np.zeros((4, 4))[:, 1], np.int32(3)))
    with pytest.raises(EmulationError, match="takes 2 arguments"):
        kernel((1,), (32,), (y,))


def test_a_launch_a_gpu_refuses_is_refused(faulty):
    kernel = faulty.kernel("faulty.cu", "write_past_the_end", np.float64)
    y = faulty.empty((2048,), np.float64)
    with pytest.raises(EmulationError, match="invalid configuration"):
        kernel((1,), (2048,), (y, np.int32(2047)))  # at most 1024 threads per block
    with pytest.raises(EmulationError, match="invalid configuration"):
        kernel((1, 70000), (1,), (y, np.int32(2047)))  # at most 65535 blocks along y


def test_new_arrays_are_poisoned(faulty):
    """Memory the runner hands out reads as NaN until written, so unwritten outputs show."""
    assert np.isnan(faulty.empty((3, 2), np.float32)).all()
    assert (faulty.empty((4,), np.int32) == -1).all()
