"""conv2d and conv_transpose2d (fast and reference) against PyTorch, forward and backward.

Each test draws a random configuration from a seeded generator (the seed is in the test id,
so a failure can be replayed): non-square kernels, unequal strides, paddings and dilations,
odd sizes, several images and channels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import minunet.functional as mf
from minunet.checks import conv2d_arguments, conv_transpose2d_arguments
from minunet.functional.im2col import col2im, column_blocks, pad2d, tiles

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's perf. note

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}  # relative to the largest magnitude


def assert_close(actual, expected, dtype, what):
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
    scale = max(np.abs(expected).max(), 1e-30)
    error = np.abs(actual.astype(np.float64) - expected).max() / scale
    assert error < TOLERANCE[dtype], f"{what}: relative error {error:.2e}"


def torch_forward_backward(op, x, weight, bias, grad_out_seed, **kwargs):
    """Output and gradients of a torch op in float64, for a random upstream gradient."""
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, weight, bias)]
    out = op(*tensors, **kwargs)
    grad_out = np.random.default_rng(grad_out_seed).standard_normal(tuple(out.shape))
    out.backward(torch.tensor(grad_out))
    return out.detach().numpy(), grad_out, [t.grad.numpy() for t in tensors]


# --- Random configurations ------------------------------------------------------------------


def random_conv_case(seed, *, small):
    """A conv2d configuration that PyTorch accepts, and the torch padding argument."""
    rng = np.random.default_rng(seed)
    kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
    dilation = tuple(int(d) for d in rng.integers(1, 4, 2))
    choice = rng.integers(5)
    if choice == 0:
        padding, stride = "same", (1, 1)
    else:
        stride = tuple(int(s) for s in rng.integers(1, 4, 2))
        if choice == 1:
            padding = "valid"
        elif choice == 2:
            padding = "full"
        else:
            padding = tuple(int(p) for p in rng.integers(0, 4, 2))
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    size = tuple(int(e + rng.integers(0, 6 if small else 12)) for e in extent)
    n, c_in, c_out = (int(v) for v in rng.integers(1, 4 if small else 5, 3))
    x = rng.standard_normal((n, c_in, *size))
    weight = rng.standard_normal((c_out, c_in, *kernel))
    bias = rng.standard_normal(c_out)
    torch_padding = padding
    if padding == "full":
        torch_padding = tuple(d * (k - 1) for k, d in zip(kernel, dilation, strict=True))
    kwargs = {"stride": stride, "padding": padding, "dilation": dilation}
    return x, weight, bias, kwargs, torch_padding


def random_conv_transpose_case(seed, *, small):
    rng = np.random.default_rng(seed)
    kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
    stride = tuple(int(s) for s in rng.integers(1, 4, 2))
    dilation = tuple(int(d) for d in rng.integers(1, 4, 2))
    output_padding = tuple(
        int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation, strict=True)
    )
    size = tuple(int(v) for v in rng.integers(1, 6 if small else 10, 2))
    # padding may crop at most what the output has beyond one pixel
    padding = tuple(
        int(rng.integers(0, 1 + min(3, ((n - 1) * s + d * (k - 1) + op) // 2)))
        for n, s, d, k, op in zip(size, stride, dilation, kernel, output_padding, strict=True)
    )
    n, c_in, c_out = (int(v) for v in rng.integers(1, 4 if small else 5, 3))
    x = rng.standard_normal((n, c_in, *size))
    weight = rng.standard_normal((c_in, c_out, *kernel))
    bias = rng.standard_normal(c_out)
    kwargs = {
        "stride": stride, "padding": padding, "output_padding": output_padding,
        "dilation": dilation,
    }
    return x, weight, bias, kwargs


FAST = (mf.conv2d, mf.conv2d_backward)
REFERENCE = (mf.conv2d_reference, mf.conv2d_backward_reference)
FAST_T = (mf.conv_transpose2d, mf.conv_transpose2d_backward)
REFERENCE_T = (mf.conv_transpose2d_reference, mf.conv_transpose2d_backward_reference)


def check_against_torch(forward, backward, dtype, x, weight, bias, kwargs, torch_out, grad_out,
                        torch_grads):
    x, weight, bias, grad_out = (a.astype(dtype) for a in (x, weight, bias, grad_out))
    assert_close(forward(x, weight, bias, **kwargs), torch_out, dtype, "forward")
    for name, actual, expected in zip(
        ("grad_x", "grad_weight", "grad_bias"),
        backward(grad_out, x, weight, **kwargs),
        torch_grads,
        strict=True,
    ):
        assert_close(actual, expected, dtype, name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(40))
def test_conv2d_fast_matches_torch(seed, dtype):
    x, weight, bias, kwargs, torch_padding = random_conv_case(seed, small=False)
    torch_out, grad_out, grads = torch_forward_backward(
        F.conv2d, x, weight, bias, seed, **{**kwargs, "padding": torch_padding}
    )
    check_against_torch(*FAST, dtype, x, weight, bias, kwargs, torch_out, grad_out, grads)


@pytest.mark.parametrize("seed", range(100, 120))
def test_conv2d_reference_matches_torch(seed):
    x, weight, bias, kwargs, torch_padding = random_conv_case(seed, small=True)
    torch_out, grad_out, grads = torch_forward_backward(
        F.conv2d, x, weight, bias, seed, **{**kwargs, "padding": torch_padding}
    )
    check_against_torch(*REFERENCE, np.float64, x, weight, bias, kwargs, torch_out, grad_out,
                        grads)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(40))
def test_conv_transpose2d_fast_matches_torch(seed, dtype):
    x, weight, bias, kwargs = random_conv_transpose_case(seed, small=False)
    torch_out, grad_out, grads = torch_forward_backward(
        F.conv_transpose2d, x, weight, bias, seed, **kwargs
    )
    check_against_torch(*FAST_T, dtype, x, weight, bias, kwargs, torch_out, grad_out, grads)


@pytest.mark.parametrize("seed", range(100, 120))
def test_conv_transpose2d_reference_matches_torch(seed):
    x, weight, bias, kwargs = random_conv_transpose_case(seed, small=True)
    torch_out, grad_out, grads = torch_forward_backward(
        F.conv_transpose2d, x, weight, bias, seed, **kwargs
    )
    check_against_torch(*REFERENCE_T, np.float64, x, weight, bias, kwargs, torch_out, grad_out,
                        grads)


@pytest.mark.parametrize("seed", range(200, 215))
def test_fast_and_reference_agree(seed):
    x, weight, bias, kwargs, _ = random_conv_case(seed, small=True)
    out = mf.conv2d(x, weight, bias, **kwargs)
    np.testing.assert_allclose(out, mf.conv2d_reference(x, weight, bias, **kwargs), rtol=1e-10,
                               atol=1e-10)
    grad_out = np.random.default_rng(seed).standard_normal(out.shape)
    for fast, reference in zip(
        mf.conv2d_backward(grad_out, x, weight, **kwargs),
        mf.conv2d_backward_reference(grad_out, x, weight, **kwargs),
        strict=True,
    ):
        np.testing.assert_allclose(fast, reference, rtol=1e-10, atol=1e-10)

    x, weight, bias, kwargs = random_conv_transpose_case(seed, small=True)
    out = mf.conv_transpose2d(x, weight, bias, **kwargs)
    np.testing.assert_allclose(out, mf.conv_transpose2d_reference(x, weight, bias, **kwargs),
                               rtol=1e-10, atol=1e-10)
    grad_out = np.random.default_rng(seed).standard_normal(out.shape)
    for fast, reference in zip(
        mf.conv_transpose2d_backward(grad_out, x, weight, **kwargs),
        mf.conv_transpose2d_backward_reference(grad_out, x, weight, **kwargs),
        strict=True,
    ):
        np.testing.assert_allclose(fast, reference, rtol=1e-10, atol=1e-10)


def check_conv_and_transpose_against_torch(seed, x, weight, bias, kwargs, torch_padding):
    """The fast convolution of this case, then a random transposed convolution of the same
    seed, against PyTorch in float64."""
    torch_out, grad_out, grads = torch_forward_backward(
        F.conv2d, x, weight, bias, seed, **{**kwargs, "padding": torch_padding}
    )
    check_against_torch(*FAST, np.float64, x, weight, bias, kwargs, torch_out, grad_out, grads)
    x, weight, bias, kwargs = random_conv_transpose_case(seed, small=False)
    torch_out, grad_out, grads = torch_forward_backward(
        F.conv_transpose2d, x, weight, bias, seed, **kwargs
    )
    check_against_torch(*FAST_T, np.float64, x, weight, bias, kwargs, torch_out, grad_out,
                        grads)


@pytest.mark.parametrize("budget_rows", [1, 3])
@pytest.mark.parametrize("seed", range(400, 408))
def test_banded_im2col_matches_torch(seed, budget_rows, monkeypatch):
    """Large images are processed in bands of output rows; force bands on small ones."""
    import minunet.functional.conv as conv_module

    x, weight, bias, kwargs, torch_padding = random_conv_case(seed, small=False)
    kh, kw = weight.shape[2:]
    bytes_per_row = x.shape[1] * kh * kw * x.shape[3] * x.itemsize  # an upper bound
    monkeypatch.setattr(conv_module, "COLUMN_BUDGET_BYTES", budget_rows * bytes_per_row // 2)
    check_conv_and_transpose_against_torch(seed, x, weight, bias, kwargs, torch_padding)


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 5), height=st.integers(1, 60), width=st.integers(1, 30),
       block_pixels=st.integers(1, 400), parts=st.integers(1, 4),
       least_bytes=st.sampled_from([0, 1000, 30000]))
def test_column_blocks_cover_every_pixel_once_in_even_blocks(batch, height, width,
                                                             block_pixels, parts, least_bytes):
    """The blocks tile (images, output rows) exactly once; none exceeds the block size the
    caller asked for (in pixels, or in bytes of columns where that is more) nor the buffer
    size returned; their lengths differ by at most one image or row; several bands of an
    image come in a multiple of ``parts`` as far as the rows go."""
    geometry = conv2d_arguments(np.zeros((batch, 2, height + 2, width + 2), np.float32),
                                np.zeros((3, 2, 3, 3), np.float32), None, 1, 0, 1)
    blocks, size = column_blocks(geometry, batch, 2, np.float32, block_pixels, 2**30, parts,
                                 least_bytes)
    block_pixels = max(block_pixels, least_bytes // (2 * 9 * 4))
    covered = np.zeros((batch, height), int)
    for images, rows, in_rows, block in blocks:
        covered[images, rows] += 1
        assert block.out_hw == (rows.stop - rows.start, width)
        assert (in_rows.start, in_rows.stop) == (rows.start, rows.stop + 2)
        pixels = (images.stop - images.start) * (rows.stop - rows.start) * width
        assert pixels * 2 * 9 <= size
        assert pixels <= max(block_pixels, width)  # at least one whole row
    assert (covered == 1).all()
    for axis in (0, 1):  # images, rows
        lengths = {block[axis].stop - block[axis].start for block in blocks}
        assert max(lengths) - min(lengths) <= 1
    bands = len({(r.start, r.stop) for _, r, *_ in blocks})
    if bands > 1:
        assert bands % parts == 0 or bands == height


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 7),
                       st.integers(1, 7)),
       padding=st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                         st.tuples(st.integers(0, 3), st.integers(0, 3))),
       value=st.sampled_from([0.0, -np.inf, 2.5]))
def test_pad2d_matches_numpy_pad(shape, padding, value):
    """pad2d is np.pad of the last two axes with a constant, and x itself for no padding."""
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    padded = pad2d(x, padding, value)
    np.testing.assert_array_equal(
        padded, np.pad(x, ((0, 0), (0, 0), *padding), constant_values=value))
    assert padded.dtype == x.dtype
    assert (padded is x) == (padding == ((0, 0), (0, 0)))


def test_thin_columns_come_in_blocks_of_least_bytes():
    """A first layer's columns (one channel, nine rows: 36 bytes a pixel) in blocks of at
    least ``least_bytes``: four 128x128 images in one block each on two threads, instead of
    bands of 1024 pixels (eight rows, 64 blocks)."""
    geometry = conv2d_arguments(np.zeros((4, 1, 128, 128), np.float32),
                                np.zeros((32, 1, 3, 3), np.float32), None, 1, 1, 1)
    bands, _ = column_blocks(geometry, 4, 1, np.float32, 1024, 2**30, 2)
    assert len(bands) == 64
    blocks, size = column_blocks(geometry, 4, 1, np.float32, 1024, 2**30, 2, 2**20)
    assert [(images.start, images.stop, rows.start, rows.stop)
            for images, rows, *_ in blocks] == [(n, n + 1, 0, 128) for n in range(4)]
    assert size == 9 * 128 * 128


def force_blocks_of(monkeypatch, pixels):
    """Blocks of about ``pixels`` output pixels, whatever their columns and weight gradient."""
    import minunet.functional.conv as conv_module

    monkeypatch.setattr(conv_module, "BLOCK_PIXELS", pixels)
    monkeypatch.setattr(conv_module, "BLOCK_LEAST_BYTES", 0)
    monkeypatch.setattr(conv_module, "PIXELS_PER_GRADIENT_COLUMN", 0)


@pytest.mark.parametrize(("c_in", "c_out", "gradient_columns"), [
    (8, 8, [8]),  # gradient columns: the (C_out*9, C_in) weight gradient of a thin layer
    (256, 256, [256]),  # the same, wide
    (128, 512, [0, 512]),  # col2im (no sum), then im2col of x: the gradient (C_in*9, C_out)
])
def test_blocks_widen_with_the_weight_gradient_they_add_to(c_in, c_out, gradient_columns,
                                                           monkeypatch):
    """The backward pass asks for blocks of at least PIXELS_PER_GRADIENT_COLUMN pixels per
    column of the weight gradient each block's product adds onto (BLOCK_PIXELS at least);
    the forward pass, which adds onto none, for BLOCK_PIXELS."""
    import minunet.functional.conv as conv_module

    asked = {"forward": [], "backward": []}
    original = conv_module.column_blocks

    def recording(geometry, batch, channels, dtype, block_pixels, *args):
        asked[phase].append(block_pixels)
        return original(geometry, batch, channels, dtype, block_pixels, *args)

    monkeypatch.setattr(conv_module, "column_blocks", recording)
    monkeypatch.setattr(conv_module, "SHIFTED_MIN_CHANNELS", 10**6)  # im2col both ways
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c_in, 6, 6)).astype(np.float32)
    weight = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
    phase = "forward"
    out = mf.conv2d(x, weight, padding=1)
    phase = "backward"
    mf.conv2d_backward(np.ones_like(out), x, weight, padding=1)
    least = conv_module.BLOCK_PIXELS
    assert asked == {"forward": [least], "backward": [
        max(least, conv_module.PIXELS_PER_GRADIENT_COLUMN * c) for c in gradient_columns]}
    assert conv_module.PIXELS_PER_GRADIENT_COLUMN * 256 > least  # the wide case widens


@pytest.mark.parametrize("block_pixels", [1, 7, 64])
@pytest.mark.parametrize("seed", range(420, 428))
def test_small_blocks_match_torch(seed, block_pixels, monkeypatch):
    """Force the block-wise paths on small images: several blocks per image (shifted
    products, gradient columns, row bands), several images per block, and single rows."""
    force_blocks_of(monkeypatch, block_pixels)
    x, weight, bias, kwargs, torch_padding = random_conv_case(seed, small=False)
    kwargs["stride"] = (1, 1)  # the shifted products and gradient columns need stride 1
    check_conv_and_transpose_against_torch(seed, x, weight, bias, kwargs, torch_padding)


# --- The U-Net's own shapes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "weight_shape", "kwargs"),
    [
        (F.conv2d, (8, 4, 3, 3), {}),  # 3x3 valid convolution
        (F.conv2d, (3, 8, 1, 1), {}),  # 1x1 classifier
        (F.conv2d, (8, 4, 3, 3), {"padding": "same"}),
        (F.conv_transpose2d, (8, 4, 2, 2), {"stride": 2}),  # 2x2 up-convolution
    ],
)
def test_unet_layers_float32(op, weight_shape, kwargs, rng):
    c_in = weight_shape[0] if op is F.conv_transpose2d else weight_shape[1]
    c_out = weight_shape[1] if op is F.conv_transpose2d else weight_shape[0]
    x, weight, bias = (rng.standard_normal(s) for s in ((2, c_in, 20, 18), weight_shape, (c_out,)))
    forward, backward = FAST_T if op is F.conv_transpose2d else FAST
    torch_out, grad_out, grads = torch_forward_backward(op, x, weight, bias, 0, **kwargs)
    check_against_torch(forward, backward, np.float32, x, weight, bias, kwargs, torch_out,
                        grad_out, grads)


@pytest.mark.parametrize(
    ("op", "size", "kwargs"),
    [  # output size = input size, yet padding and stride matter
        (F.conv2d, (2, 2), {"padding": 1, "stride": 2}),
        (F.conv2d, (2, 5), {"padding": (1, 0), "stride": (3, 1)}),
        (F.conv_transpose2d, (2, 2), {"padding": 1, "stride": 2, "output_padding": 1}),
        (F.conv_transpose2d, (3, 4), {"dilation": 2, "output_padding": 1}),
    ],
)
def test_one_by_one_kernels_that_are_not_pointwise(op, size, kwargs, rng):
    """1x1 kernels take a shortcut only without padding and stride; these must not."""
    c_in, c_out = 3, 2
    shape = (c_in, c_out, 1, 1) if op is F.conv_transpose2d else (c_out, c_in, 1, 1)
    x, weight, bias = (rng.standard_normal(s) for s in ((2, c_in, *size), shape, (c_out,)))
    forward, backward = FAST_T if op is F.conv_transpose2d else FAST
    torch_out, grad_out, grads = torch_forward_backward(op, x, weight, bias, 1, **kwargs)
    check_against_torch(forward, backward, np.float64, x, weight, bias, kwargs, torch_out,
                        grad_out, grads)


# --- The transposed convolution is the convolution's input gradient -------------------------


def transposable_conv_case(seed):
    """A random convolution whose input size a transposed convolution can produce.

    Returns x, weight, the conv2d kwargs and the matching ``output_padding``. Padding is
    numeric (transposed convolutions take no strings) and at most half the kernel's extent,
    so that no padded row is all the convolution sees.
    """
    x, weight, _, kwargs, _ = random_conv_case(seed, small=True)
    padding = (0, 0) if isinstance(kwargs["padding"], str) else kwargs["padding"]
    kwargs["padding"] = tuple(
        min(p, d * (k - 1) // 2)
        for p, d, k in zip(padding, kwargs["dilation"], weight.shape[2:], strict=True)
    )
    # A strided convolution may never read the last rows of x; output_padding restores them
    # when it may (it must be smaller than stride or dilation), else we trim them off x.
    unread = [
        (n + 2 * p - d * (k - 1) - 1) % s
        for n, p, d, k, s in zip(x.shape[2:], kwargs["padding"], kwargs["dilation"],
                                 weight.shape[2:], kwargs["stride"], strict=True)
    ]
    allowed = [r < max(s, d) for r, s, d in zip(unread, kwargs["stride"], kwargs["dilation"],
                                                strict=True)]
    output_padding = tuple(r if ok else 0 for r, ok in zip(unread, allowed, strict=True))
    h, w = (n - (0 if ok else r) for n, r, ok in zip(x.shape[2:], unread, allowed, strict=True))
    return x[:, :, :h, :w], weight, kwargs, output_padding


TILING_CASES = [  # kernel, stride, padding, output_padding, batch; tiled or not
    (2, 2, 0, 0, 1, True), (2, 2, 0, 0, 3, True), (3, 3, 0, 0, 2, True),
    ((2, 3), (2, 3), 0, 0, 2, True), (2, 2, 1, 0, 2, True), (3, 3, 1, 0, 1, True),
    (2, 2, 0, 1, 2, False), (3, 3, 1, 2, 1, False), (3, 2, 0, 0, 2, False),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "output_padding", "batch", "tiled"),
                         TILING_CASES)
def test_tiling_transposed_convolution_matches_torch(kernel, stride, padding, output_padding,
                                                     batch, tiled):
    """Windows that tile the output (stride = kernel) write each pixel once instead of
    adding to zeros; an output padding leaves a row or column that no window writes."""
    rng = np.random.default_rng(7)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = rng.standard_normal((batch, 5, 7, 6))
    weight, bias = rng.standard_normal((5, 4, kh, kw)), rng.standard_normal(4)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding)
    geometry = conv_transpose2d_arguments(x, weight, bias, stride, padding, output_padding, 1)
    assert tiles(geometry) == tiled
    torch_out, grad_out, grads = torch_forward_backward(F.conv_transpose2d, x, weight, bias, 3,
                                                        **kwargs)
    check_against_torch(*FAST_T, np.float64, x, weight, bias, kwargs, torch_out, grad_out,
                        grads)


@pytest.mark.parametrize(("kernel", "stride", "padding", "output_padding", "batch", "tiled"),
                         [case for case in TILING_CASES if case[-1]])
def test_col2im_overwrites_exactly_the_tiled_pixels(kernel, stride, padding, output_padding,
                                                    batch, tiled):
    """Written over NaN, every pixel of a tiled output gets its one value: the sums col2im
    adds to zeros, bit for bit."""
    rng = np.random.default_rng(8)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x, weight = rng.standard_normal((batch, 3, 4, 5)), rng.standard_normal((3, 2, kh, kw))
    geometry = conv_transpose2d_arguments(x, weight, None, stride, padding, output_padding, 1)
    cols = rng.standard_normal((batch, 2 * kh * kw, 4 * 5))
    added = col2im(cols, geometry)
    written = col2im(cols, geometry, out=np.full_like(added, np.nan), overwrite=True)
    np.testing.assert_array_equal(written, added)


@pytest.mark.parametrize("seed", range(300, 310))
def test_transposed_convolution_is_the_input_gradient(seed):
    """conv_transpose2d(g, w) = grad_x of conv2d, and conv_transpose2d's grad_x = conv2d."""
    x, weight, kwargs, output_padding = transposable_conv_case(seed)
    out = mf.conv2d(x, weight, **kwargs)
    grad_out = np.random.default_rng(seed).standard_normal(out.shape)
    grad_x, _, _ = mf.conv2d_backward(grad_out, x, weight, **kwargs)
    transposed = mf.conv_transpose2d(grad_out, weight, output_padding=output_padding, **kwargs)
    np.testing.assert_allclose(transposed, grad_x, rtol=1e-12, atol=1e-12)

    grad_of_transposed, _, _ = mf.conv_transpose2d_backward(
        x, grad_out, weight, output_padding=output_padding, **kwargs
    )
    np.testing.assert_allclose(grad_of_transposed, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(310, 320))
def test_convolution_and_transpose_are_adjoint(seed):
    """<conv2d(x, w), y> = <x, conv_transpose2d(y, w)>: the defining property of a transpose."""
    x, weight, kwargs, output_padding = transposable_conv_case(seed)
    out = mf.conv2d(x, weight, **kwargs)
    y = np.random.default_rng(seed).standard_normal(out.shape)
    back = mf.conv_transpose2d(y, weight, output_padding=output_padding, **kwargs)
    assert np.vdot(out, y) == pytest.approx(np.vdot(x, back), rel=1e-10)


def test_im2col_and_col2im_are_adjoint(rng):
    x, weight, _, kwargs, _ = random_conv_case(7, small=True)
    from minunet.checks import conv2d_arguments

    geometry = conv2d_arguments(x, weight, None, **kwargs)
    x_pad = rng.standard_normal((x.shape[0], x.shape[1], *geometry.padded_hw))
    cols = mf.im2col(x_pad, geometry)
    other = rng.standard_normal(cols.shape)
    assert np.vdot(cols, other) == pytest.approx(np.vdot(x_pad, mf.col2im(other, geometry)),
                                                 rel=1e-12)


# --- Contracts: dtype kept, inputs untouched ------------------------------------------------


@pytest.mark.parametrize(
    ("forward", "backward", "weight_shape", "kwargs"),
    [
        (*FAST, (4, 3, 3, 2), {"stride": 2, "padding": (1, 2)}),
        (*REFERENCE, (4, 3, 3, 2), {"stride": 2, "padding": (1, 2)}),
        (*FAST_T, (3, 4, 3, 2), {"stride": 2, "padding": 1, "output_padding": 1}),
        (*REFERENCE_T, (3, 4, 3, 2), {"stride": 2, "padding": 1, "output_padding": 1}),
    ],
)
def test_inputs_are_not_modified(forward, backward, weight_shape, kwargs, rng):
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    weight = rng.standard_normal(weight_shape).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    originals = [a.copy() for a in (x, weight, bias)]
    out = forward(x, weight, bias, **kwargs)
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    grad_copy = grad_out.copy()
    grads = backward(grad_out, x, weight, **kwargs)
    for original, array in zip(originals + [grad_copy], (x, weight, bias, grad_out), strict=True):
        np.testing.assert_array_equal(original, array)
    assert all(g.dtype == np.float32 for g in (out, *grads))


@pytest.mark.parametrize(
    ("forward", "backward", "weight_shape", "kwargs"),
    [
        (*FAST, (4, 3, 3, 3), {}),
        (*FAST, (4, 3, 1, 1), {}),
        (*FAST_T, (3, 4, 2, 2), {"stride": 2}),
    ],
    ids=["conv3x3", "conv1x1", "upconv2x2"],
)
def test_non_contiguous_views_give_the_same_results(forward, backward, weight_shape, kwargs,
                                                    rng):
    """The U-Net crops its skip connections: kernels must accept strided views."""
    x_big = rng.standard_normal((2, 3, 12, 13))
    x_view = x_big[:, :, 1:-2, 2:-1]  # (2, 3, 9, 10), not contiguous
    weight_view = rng.standard_normal(weight_shape[::-1]).transpose(3, 2, 1, 0)
    x, weight = np.ascontiguousarray(x_view), np.ascontiguousarray(weight_view)
    out = forward(x, weight, **kwargs)
    np.testing.assert_allclose(forward(x_view, weight_view, **kwargs), out, rtol=1e-12,
                               atol=1e-12)
    grad_out_view = rng.standard_normal(out.shape[::-1]).T  # every axis reversed in memory
    grad_out = np.ascontiguousarray(grad_out_view)
    for from_views, from_copies in zip(
        backward(grad_out_view, x_view, weight_view, **kwargs),
        backward(grad_out, x, weight, **kwargs),
        strict=True,
    ):
        np.testing.assert_allclose(from_views, from_copies, rtol=1e-12, atol=1e-12)


# --- Edge sizes, explored by hypothesis -----------------------------------------------------

small_pairs = st.tuples(st.integers(1, 3), st.integers(1, 3))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    kernel=small_pairs,
    stride=small_pairs,
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    transposed=st.booleans(),
    extra=st.integers(0, 2),
)
def test_tiny_edge_configurations(size, kernel, stride, dilation, padding, transposed, extra):
    """Where PyTorch accepts a configuration we must agree with it; where it refuses, we
    must refuse with a ValueError. Sizes down to one pixel, kernels covering all of it."""
    rng = np.random.default_rng(sum(size + kernel + stride + dilation + padding) + extra)
    kwargs = {"stride": stride, "padding": padding, "dilation": dilation}
    if transposed:
        kwargs["output_padding"] = tuple(min(extra, max(s, d) - 1)
                                         for s, d in zip(stride, dilation, strict=True))
    op = F.conv_transpose2d if transposed else F.conv2d
    forward, backward = FAST_T if transposed else FAST
    x, weight, bias = (rng.standard_normal(s) for s in ((2, 2, *size), (2, 3, *kernel), (3,)))
    if not transposed:
        weight = weight.transpose(1, 0, 2, 3).copy()
    try:
        torch_out, grad_out, grads = torch_forward_backward(op, x, weight, bias, 0, **kwargs)
    except RuntimeError:
        with pytest.raises(ValueError):
            forward(x, weight, bias, **kwargs)
        return
    check_against_torch(forward, backward, np.float64, x, weight, bias, kwargs, torch_out,
                        grad_out, grads)


# --- The shifted products: every stride-1 case, forced onto them -----------------------------


@pytest.mark.parametrize("block_columns", [5, 4096])
@pytest.mark.parametrize("backend", ["blas", "numpy"])
@pytest.mark.parametrize("seed", range(440, 452))
def test_shifted_products_match_torch(seed, block_columns, backend, monkeypatch):
    """Forward and (with more output than input channels) input gradient by shifted
    products, on every stride-1 geometry: dilations, uneven and 'full' paddings, several
    images, blocks that cut through rows and images; with BLAS's gemm and without it."""
    import minunet.functional.blas as blas_module
    import minunet.functional.conv as conv_module

    monkeypatch.setattr(conv_module, "SHIFTED_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "SHIFTED_MIN_USEFUL", 0.0)
    monkeypatch.setattr(conv_module, "SHIFTED_BLOCK_COLUMNS", (block_columns, block_columns))
    # The taps and the weight gradient are transposed tile by tile: ragged tiles here.
    monkeypatch.setattr(conv_module, "TRANSPOSE_TILE_BYTES", 5 * 8)
    monkeypatch.setattr(conv_module, "TRANSPOSE_TILE_COLUMNS", 3)
    if backend == "numpy":
        monkeypatch.setattr(blas_module, "_GEMM", {})
    calls = []
    shifted = conv_module._correlate_by_shifted_products
    monkeypatch.setattr(conv_module, "_correlate_by_shifted_products",
                        lambda *args: calls.append(args[0].shape) or shifted(*args))
    x, weight, bias, kwargs, torch_padding = random_conv_case(seed, small=False)
    kwargs["stride"] = (1, 1)
    if seed % 2:  # more output than input channels: the backward's shifted branch
        weight = np.concatenate([weight, weight[::-1] * 0.5], axis=0)[:, :1]
        x, bias = x[:, :1], np.concatenate([bias, bias])
    torch_out, grad_out, grads = torch_forward_backward(
        F.conv2d, x, weight, bias, seed, **{**kwargs, "padding": torch_padding})
    check_against_torch(*FAST, np.float64, x, weight, bias, kwargs, torch_out, grad_out, grads)
    backward_too = weight.shape[0] > weight.shape[1] and _carries_back(weight, kwargs)
    assert len(calls) == 1 + backward_too


@pytest.mark.parametrize(("c_in", "c_out", "route"), [(8, 16, "shifted"), (8, 8, "columns"),
                                                     (16, 8, "columns"), (1, 16, "col2im")])
def test_backward_route_by_channels_matches_torch(c_in, c_out, route, monkeypatch):
    """The input gradient goes by shifted products only with more output than input
    channels, enough input channels for their rows and few junk outputs; with as many or
    fewer output channels both gradients come from one im2col of grad_out (as large as x's
    columns when the counts are equal); a single input channel takes col2im. Either way the
    numbers are PyTorch's."""
    import minunet.functional.conv as conv_module

    routes = []
    for name, label in (("_correlate_by_shifted_products", "shifted"),
                        ("_gradients_from_gradient_columns", "columns"),
                        ("_input_gradient", "col2im")):
        original = getattr(conv_module, name)
        monkeypatch.setattr(conv_module, name, lambda *args, original=original, label=label:
                            routes.append(label) or original(*args))
    rng = np.random.default_rng(c_in + c_out)
    x = rng.standard_normal((2, c_in, 20, 19))  # 82 % of the padded flat pixels useful
    weight, bias = rng.standard_normal((c_out, c_in, 3, 3)), rng.standard_normal(c_out)
    torch_out, grad_out, grads = torch_forward_backward(F.conv2d, x, weight, bias, 3,
                                                        padding="same")
    check_against_torch(*FAST, np.float64, x, weight, bias, {"padding": "same"}, torch_out,
                        grad_out, grads)
    assert routes[-1] == route  # the input gradient's route, after the forward pass's


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("seed", range(460, 470))
def test_backward_without_input_gradient_matches_torch(seed, transposed):
    """``input_gradient=False`` returns None for grad_x and PyTorch's parameter gradients
    for an input that does not require one (a first layer's data)."""
    if transposed:
        x, weight, bias, kwargs = random_conv_transpose_case(seed, small=False)
        torch_op, backward, torch_kwargs = F.conv_transpose2d, mf.conv_transpose2d_backward, kwargs
    else:
        x, weight, bias, kwargs, torch_padding = random_conv_case(seed, small=False)
        torch_op, backward = F.conv2d, mf.conv2d_backward
        torch_kwargs = {**kwargs, "padding": torch_padding}
    parameters = [torch.tensor(a, requires_grad=True) for a in (weight, bias)]
    out = torch_op(torch.tensor(x), *parameters, **torch_kwargs)
    grad_out = np.random.default_rng(seed).standard_normal(tuple(out.shape))
    out.backward(torch.tensor(grad_out))
    grad_x, *grads = backward(grad_out, x, weight, **kwargs, input_gradient=False)
    assert grad_x is None
    for name, actual, expected in zip(("grad_weight", "grad_bias"), grads, parameters,
                                      strict=True):
        assert_close(actual, expected.grad.numpy(), np.float64, name)


@pytest.mark.parametrize("block_columns", [7, 4096])
@pytest.mark.parametrize(("kernel", "dilation"), [((3, 3), (1, 1)), ((2, 3), (2, 1))])
@pytest.mark.parametrize("contiguous", [True, False])
def test_one_unpadded_image_is_read_in_place(block_columns, kernel, dilation, contiguous,
                                             monkeypatch):
    """One image, no padding: the shifted products read the image itself and stop at the
    last valid output (its last tap is the image's last pixel). Forward with bias, and a
    view of a larger array, against PyTorch."""
    import minunet.functional.conv as conv_module

    monkeypatch.setattr(conv_module, "SHIFTED_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "SHIFTED_MIN_USEFUL", 0.0)
    monkeypatch.setattr(conv_module, "SHIFTED_BLOCK_COLUMNS", (block_columns, block_columns))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 6, 13, 11))
    if not contiguous:
        x = rng.standard_normal((2, 12, 13, 11))[1:, ::2]
    weight, bias = rng.standard_normal((5, 6, *kernel)), rng.standard_normal(5)
    calls = []
    shifted = conv_module._correlate_by_shifted_products
    monkeypatch.setattr(conv_module, "_correlate_by_shifted_products",
                        lambda *args: calls.append(args[0].shape) or shifted(*args))
    ours = mf.conv2d(x, weight, bias, dilation=dilation)
    theirs = F.conv2d(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x, weight, bias)),
                      dilation=dilation).numpy()
    assert calls == [x.shape]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("tile_bytes", "tile_columns"), [(1, 1), (40, 3), (2**17, 1024)])
def test_transposed_copy_goes_tile_by_tile(tile_bytes, tile_columns, monkeypatch):
    """_transposed copies ``matrix.T`` in tiles; ragged tiles at both edges, tiles of one
    element and a single tile must all give NumPy's transpose exactly."""
    import minunet.functional.conv as conv_module

    monkeypatch.setattr(conv_module, "TRANSPOSE_TILE_BYTES", tile_bytes)
    monkeypatch.setattr(conv_module, "TRANSPOSE_TILE_COLUMNS", tile_columns)
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 5), (37, 9), (300, 130), (4, 2000)]:
        matrix = rng.standard_normal(shape).astype(np.float32)
        transposed = conv_module._transposed(matrix)
        assert transposed.flags.c_contiguous
        np.testing.assert_array_equal(transposed, matrix.T)


def test_shifted_products_ignore_what_their_scratch_held(monkeypatch):
    """The flat buffers are reused from call to call: calls that fill them with NaN, then
    smaller padded calls, forward and backward, must give PyTorch's results (every padding
    zero written again), and a result must not change when the next call reuses them."""
    import minunet.functional.conv as conv_module

    monkeypatch.setattr(conv_module, "SHIFTED_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "SHIFTED_MIN_USEFUL", 0.0)
    rng = np.random.default_rng(0)
    nan_x, nan_w = np.full((2, 3, 20, 20), np.nan), np.ones((4, 3, 3, 3))
    mf.conv2d_backward(mf.conv2d(nan_x, nan_w, padding=1), nan_x, nan_w, padding=1)
    results = []
    for padding in [(2, 1), "same", "full"]:
        x, weight = rng.standard_normal((2, 3, 9, 7)), rng.standard_normal((4, 3, 3, 3))
        out = mf.conv2d(x, weight, padding=padding)
        grad_out = rng.standard_normal(out.shape)
        grads = mf.conv2d_backward(grad_out, x, weight, padding=padding)
        tx, tw = (torch.from_numpy(a).requires_grad_() for a in (x, weight))
        torch_out = F.conv2d(tx, tw, padding={"full": 2}.get(padding, padding))
        torch_out.backward(torch.from_numpy(grad_out))
        for ours, theirs in zip((out, *grads[:2]), (torch_out, tx.grad, tw.grad), strict=True):
            np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, atol=1e-12)
        results += [(array, array.copy()) for array in (out, *grads)]
    for kept, copy in results:
        np.testing.assert_array_equal(kept, copy)


def _carries_back(weight, kwargs):
    """Whether grad_out can be padded onto the input grid (padding <= d*(k-1) per side)."""
    if kwargs["padding"] in ("same", "valid", "full"):
        return True
    return all(p <= d * (k - 1) for p, d, k in
               zip(kwargs["padding"], kwargs["dilation"], weight.shape[2:], strict=True))


def test_unet_layer_with_many_channels_float32(rng):
    """A U-Net-sized 3x3 layer (16 -> 32 channels) on the default paths, in float32."""
    x, weight, bias = (rng.standard_normal(s) for s in ((2, 16, 40, 36), (32, 16, 3, 3), (32,)))
    torch_out, grad_out, grads = torch_forward_backward(F.conv2d, x, weight, bias, 0, padding=1)
    check_against_torch(*FAST, np.float32, x, weight, bias, {"padding": 1}, torch_out,
                        grad_out, grads)


# --- Work shared out to threads ---------------------------------------------------------------


@pytest.fixture(params=[2, 3])
def shares(request, monkeypatch):
    """Kernels share their work out to this many threads, whatever the machine's BLAS and
    however small the images."""
    import minunet.functional.conv as conv_module
    from minunet.functional import threads

    monkeypatch.setattr(threads, "blas_threads", lambda: request.param)
    monkeypatch.setattr(conv_module, "SHARE_MIN_MULTIPLY_ADDS", 1)
    return request.param


def test_small_kernels_run_in_the_calling_thread(shares, monkeypatch):
    import minunet.functional.conv as conv_module

    monkeypatch.setattr(conv_module, "SHARE_MIN_MULTIPLY_ADDS", 1000)
    assert conv_module._shares(1000) == shares
    assert conv_module._shares(999) == 1


@pytest.mark.parametrize("seed", range(440, 446))
def test_blocks_shared_out_to_threads_match_torch(seed, shares, monkeypatch):
    """Runs of blocks on several threads: im2col products, the weight gradient summed from
    each thread's part, gradient columns, tiled col2im."""
    force_blocks_of(monkeypatch, 5)
    x, weight, bias, kwargs, torch_padding = random_conv_case(seed, small=False)
    if seed % 2:
        kwargs["stride"] = (1, 1)  # the gradient columns need stride 1
    check_conv_and_transpose_against_torch(seed, x, weight, bias, kwargs, torch_padding)


@pytest.mark.parametrize(("x_shape", "weight_shape", "padding"), [
    ((3, 8, 13, 11), (16, 8, 3, 3), "same"),  # shifted products forward and backward
    ((1, 8, 19, 17), (8, 8, 3, 3), "valid"),  # one unpadded image: read where it lies
    ((3, 16, 9, 10), (8, 16, 3, 3), "same"),  # backward from gradient columns
    ((2, 8, 7, 6), (4, 8, 1, 1), 0),  # pointwise, one image per block
    ((1, 8, 7, 6), (4, 8, 1, 1), 0),  # pointwise, one block: shared out by rows
    ((2, 8, 4, 4), (16, 8, 3, 3), "same"),  # small maps: im2col, one block
])
def test_unet_convolutions_shared_out_to_threads_match_torch(x_shape, weight_shape, padding,
                                                             shares, rng):
    x, weight, bias = (rng.standard_normal(s) for s in (x_shape, weight_shape,
                                                       weight_shape[:1]))
    torch_out, grad_out, grads = torch_forward_backward(F.conv2d, x, weight, bias, 7,
                                                        padding=padding)
    check_against_torch(*FAST, np.float64, x, weight, bias, {"padding": padding}, torch_out,
                        grad_out, grads)
    up_weight = rng.standard_normal((x_shape[1], 4, 2, 2))
    torch_out, grad_out, grads = torch_forward_backward(F.conv_transpose2d, x, up_weight,
                                                        bias[:4], 8, stride=2)
    check_against_torch(*FAST_T, np.float64, x, up_weight, bias[:4], {"stride": 2},
                        torch_out, grad_out, grads)
