"""Random geometries for the CUDA kernels (emulated on the CPU), drawn by Hypothesis.

The fixed cases of ``test_cuda_kernels.py`` are chosen by hand; here Hypothesis draws
sizes, kernel shapes, strides, paddings (numbers, "valid", "same", "full"), dilations and
channel counts on both sides of the 16-wide tiles, and every kernel must agree with the
NumPy kernels of :mod:`minunet.functional` in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from minunet import functional as F
from minunet import shapes
from minunet.cuda import ops
from minunet.cuda.emulator import EmulatedRunner, compiler

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

EXAMPLES = hypothesis.settings(max_examples=25, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """:mod:`minunet.cuda.ops` launches its kernels on the CPU emulation in this module."""
    if compiler() is None:
        pytest.skip("the CPU emulation of the CUDA kernels needs g++ (apt install g++)")
    emulated = EmulatedRunner(tmp_path_factory.mktemp("cuda_emu_properties"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "gpu_runner", lambda: emulated)
        yield emulated


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)


@st.composite
def conv_problems(draw):
    """``(x, weight, kwargs)`` of a convolution whose output is not empty."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.one_of(st.sampled_from(["valid", "same", "full"]),
                             st.tuples(st.integers(0, 2), st.integers(0, 2))))
    if padding == "same":
        stride = (1, 1)
    resolved = shapes.resolve_padding(padding, kernel, stride, dilation)
    extent = [shapes.dilated_kernel_size(k, d) for k, d in zip(kernel, dilation, strict=True)]
    size = [draw(st.integers(max(1, e - sum(p)), e + 8))
            for e, p in zip(extent, resolved, strict=True)]
    batch, c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(
        st.sampled_from([1, 3, 16, 17]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, c_in, *size))
    weight = rng.standard_normal((c_out, c_in, *kernel))
    return x, weight, dict(stride=stride, padding=padding, dilation=dilation)


@EXAMPLES
@hypothesis.given(problem=conv_problems(), algorithm=st.sampled_from(ops.ALGORITHMS))
def test_conv2d_on_random_geometries(runner, problem, algorithm):
    x, weight, kwargs = problem
    bias = np.linspace(-1, 1, weight.shape[0])
    y = ops.conv2d(x, weight, bias, algorithm=algorithm, **kwargs)
    assert_close(y, F.conv2d(x, weight, bias, **kwargs))
    grad_out = np.cos(np.arange(y.size)).reshape(y.shape)
    got = ops.conv2d_backward(grad_out, x, weight, algorithm=algorithm,
                              **kwargs)
    for mine, oracle in zip(got, F.conv2d_backward(grad_out, x, weight, **kwargs),
                            strict=True):
        assert_close(mine, oracle)


@st.composite
def transpose_problems(draw):
    """``(x, weight, kwargs)`` of a transposed convolution whose output is not empty."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1))
                           for s, d in zip(stride, dilation, strict=True))
    size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    padding = tuple(
        draw(st.integers(0, max(0, ((n - 1) * s + shapes.dilated_kernel_size(k, d) + op - 1)
                                // 2)))
        for n, s, k, d, op in zip(size, stride, kernel, dilation, output_padding, strict=True)
    )
    batch, c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(
        st.sampled_from([1, 2, 17]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((batch, c_in, *size))
    weight = rng.standard_normal((c_in, c_out, *kernel))
    return x, weight, dict(stride=stride, padding=padding, output_padding=output_padding,
                           dilation=dilation)


@EXAMPLES
@hypothesis.given(problem=transpose_problems(), algorithm=st.sampled_from(ops.ALGORITHMS))
def test_conv_transpose2d_on_random_geometries(runner, problem, algorithm):
    x, weight, kwargs = problem
    bias = np.linspace(-1, 1, weight.shape[1])
    y = ops.conv_transpose2d(x, weight, bias, algorithm=algorithm, **kwargs)
    assert_close(y, F.conv_transpose2d(x, weight, bias, **kwargs))
    grad_out = np.sin(np.arange(y.size)).reshape(y.shape)
    got = ops.conv_transpose2d_backward(grad_out, x, weight, algorithm=algorithm, **kwargs)
    for mine, oracle in zip(got, F.conv_transpose2d_backward(grad_out, x, weight, **kwargs),
                            strict=True):
        assert_close(mine, oracle)


@EXAMPLES
@hypothesis.given(data=st.data())
def test_max_pool2d_on_random_geometries(runner, data):
    kernel = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    stride = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in kernel)
    size = tuple(data.draw(st.integers(max(1, k - 2 * p), 9))
                 for k, p in zip(kernel, padding, strict=True))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x = rng.integers(0, 4, (2, 2, *size)).astype(np.float64)  # ties are common
    kwargs = dict(kernel_size=kernel, stride=stride, padding=padding)
    y, indices = ops.max_pool2d(x, return_indices=True, **kwargs)
    expected, expected_indices = F.max_pool2d(x, return_indices=True, **kwargs)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(indices, expected_indices)
    grad_out = rng.standard_normal(y.shape)
    assert_close(ops.max_pool2d_backward(grad_out, x, **kwargs),
                 F.max_pool2d_backward(grad_out, x, **kwargs))
