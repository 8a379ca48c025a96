"""2-D convolution and its gradients.

Conventions are PyTorch's: ``x`` is (N, C_in, H, W), ``weight`` is (C_out, C_in, kH, kW),
and "convolution" means cross-correlation (the kernel is not flipped):

    out[n, o, i, j] = bias[o]
                      + sum_{c, a, b} weight[o, c, a, b] * x_pad[n, c, i*s_h + a*d_h, j*s_w + b*d_w]

    H_out = floor((H + p_top + p_bottom - d_h*(kH - 1) - 1) / s_h) + 1     (likewise W_out)

The fast kernels are matrix products around :func:`~minunet.functional.im2col.im2col`
(with ``K = C_in*kH*kW`` and ``L = H_out*W_out``, for each image):

* forward:         out    (C_out, L) = weight (C_out, K) @ cols (K, L)
* weight gradient: grad_w (C_out, K) = grad_out (C_out, L) @ cols.T (L, K)      (summed over n)
* input gradient:  grad_x = col2im(weight.T (K, C_out) @ grad_out (C_out, L))

The input gradient *is* the transposed convolution: :mod:`~minunet.functional.conv_transpose`
is built from the very same three private kernels (:func:`_correlate`,
:func:`_weight_gradient`, :func:`_input_gradient`) with the roles of the arrays exchanged;
its backward pass runs the first two in one pass over the columns (:func:`_column_products`).

Two faster routes serve the stride-1 convolutions of a U-Net, each explained where it is
defined: the backward pass from one im2col of grad_out
(:func:`_gradients_from_gradient_columns`), and shifted products over the flattened padded
images, summed in place by BLAS, that build no column matrix
(:func:`_correlate_by_shifted_products`: the forward pass, and the input gradient where a
layer has more output than input channels). Column matrices are built block by
block, so the memory stays bounded (see ``BLOCK_PIXELS``), and the blocks are shared out to
threads, copies and products together, each thread with one-thread BLAS
(:mod:`~minunet.functional.threads`); each thread sums its own part of a weight gradient.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from minunet.checks import ConvGeometry, check_grad_out, conv2d_arguments
from minunet.functional._dispatch import dispatch_on_array_type
from minunet.functional.blas import gemm
from minunet.functional.im2col import (
    col2im,
    column_blocks,
    crop2d,
    im2col,
    pad2d,
    receptive_field,
    tiles,
)
from minunet.functional.threads import run_at_once, share_count, split

# --- Reference kernels: loops that read like the equations ---------------------------------


def conv2d_reference(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """2-D convolution with explicit loops over output pixels.

    x (N, C_in, H, W), weight (C_out, C_in, kH, kW), bias (C_out,) or None
    -> out (N, C_out, H_out, W_out), where

        out[n, o, i, j] = bias[o]
                      + sum_{c, a, b} weight[o, c, a, b] * x_pad[n, c, i*s_h + a*d_h, j*s_w + b*d_w]

    Arguments as :func:`conv2d`.
    """
    geometry = conv2d_arguments(x, weight, bias, stride, padding, dilation)
    x_pad = pad2d(x, geometry.padding)
    batch, c_out = x.shape[0], weight.shape[0]
    out = np.zeros((batch, c_out, *geometry.out_hw), dtype=x.dtype)
    for n in range(batch):
        for o in range(c_out):
            for i in range(geometry.out_hw[0]):
                for j in range(geometry.out_hw[1]):
                    rows, cols = receptive_field(i, j, geometry)
                    out[n, o, i, j] = np.sum(weight[o] * x_pad[n, :, rows, cols])
    if bias is not None:
        out += bias[:, None, None]
    return out


def conv2d_backward_reference(grad_out, x, weight, stride=1, padding=0, dilation=1):
    """Gradients of :func:`conv2d_reference`, with the same loops.

    grad_out (N, C_out, H_out, W_out) -> (grad_x (N, C_in, H, W),
    grad_weight (C_out, C_in, kH, kW), grad_bias (C_out,)). Each output pixel sends its
    upstream gradient back along the products that made it:

        grad_x_pad[n, :, window(i, j)] += grad_out[n, o, i, j] * weight[o]
        grad_weight[o]                 += grad_out[n, o, i, j] * x_pad[n, :, window(i, j)]
        grad_bias[o]                    = sum_{n, i, j} grad_out[n, o, i, j]
    """
    geometry = conv2d_arguments(x, weight, None, stride, padding, dilation)
    check_grad_out(grad_out, (x.shape[0], weight.shape[0], *geometry.out_hw), x)
    x_pad = pad2d(x, geometry.padding)
    grad_x_pad = np.zeros_like(x_pad)
    grad_weight = np.zeros_like(weight)
    for n in range(x.shape[0]):
        for o in range(weight.shape[0]):
            for i in range(geometry.out_hw[0]):
                for j in range(geometry.out_hw[1]):
                    rows, cols = receptive_field(i, j, geometry)
                    g = grad_out[n, o, i, j]
                    grad_x_pad[n, :, rows, cols] += g * weight[o]
                    grad_weight[o] += g * x_pad[n, :, rows, cols]
    return crop2d(grad_x_pad, geometry), grad_weight, grad_out.sum(axis=(0, 2, 3))


# --- Fast kernels: im2col + one matrix product ---------------------------------------------
#
# For one image the forward pass is ``weight (C_out, K) @ im2col(x) (K, L)``, and the kernels
# below compute exactly that, with one option to keep the memory bounded: the column matrix
# is kH*kW times larger than the input (for the paper's first 3x3 layers, 64*9 rows by
# 570*570 columns, 750 MB), so it is never built whole. It is built one *block* of output
# pixels at a time, in one reused buffer, and multiplied block by block. A block holds about
# BLOCK_PIXELS output pixels: whole output rows of one image, or several whole images when
# the images are small (the deep levels' 8x8 maps), so that every product is wide enough to
# run at full speed; and never more than COLUMN_BUDGET_BYTES of columns, whatever the image.
# Measured on the U-Net's layers, blocks of about 500 pixels are also the fastest choice
# for the thin layers: their columns are still in the CPU's cache (a megabyte per core)
# when the product reads them. Wider layers want wider blocks: a block whose product adds
# onto a weight gradient (K rows by C columns) reads and writes that whole sum once per
# block, as many bytes as the block's own columns (K rows by BLOCK_PIXELS) when C is as
# large as the block; at least PIXELS_PER_GRADIENT_COLUMN pixels per column of the sum
# keep that traffic to half the columns' or less. Against blocks of 1024 pixels for all: the
# backward passes of the 32-channel U-Net's layers on a share of its batch up to 10 %
# faster (32 channels on 128x128 maps 12.6 -> 11.2 ms), those of the paper's 256- to
# 1024-channel layers, in blocks of 1024-4096 pixels, as fast or a few percent faster;
# whole training steps, alternating in one process: the 32-channel U-Net's 351 -> 334 ms,
# the paper's 4.22 -> 4.13 s.
# A block also costs some microseconds in Python whatever its size, which matters only
# where its columns are few: the first layer's nine rows (one input channel) in blocks of
# 1024 pixels made hundreds of blocks of 36 kB. Blocks of at least BLOCK_LEAST_BYTES of
# columns: that layer's forward and backward pass on four 128x128 tiles 1.7 + 5.3 -> 1.1
# + 2.8 ms, on the paper's 572x572 tile the backward pass 65 -> 37 ms (4 MiB blocks were
# slower again).
BLOCK_PIXELS = 512
BLOCK_LEAST_BYTES = 2**20
PIXELS_PER_GRADIENT_COLUMN = 4
COLUMN_BUDGET_BYTES = 64 * 2**20
# The shifted products (see _correlate_by_shifted_products): about this many bytes of
# partial sums per block (within the bounds on its columns), the fewest input channels for
# which C_in-row products beat one im2col product, and the least useful fraction of the
# flat positions (the rest are the junk beside and below each image). A 16x16 map padded by
# one pixel is 79 % useful: by im2col instead, the 32-channel U-Net's four 16x16 layers
# ran 2-10 % faster as training runs them (forward and backward, alternating in one
# process); 32x32 maps (89 %) were as fast either way.
SHIFTED_BLOCK_BYTES = 4 * 2**20
SHIFTED_BLOCK_COLUMNS = (2048, 16384)
SHIFTED_MIN_CHANNELS = 8
SHIFTED_MIN_USEFUL = 0.8
# Scratch arrays: the shifted products' two flat arrays (the padded input and the padded
# output, the largest as large as a feature map), a block's columns, and the weight gradient
# while its blocks are summed (one for each share of the work a thread has run: a thread may
# run two shares of one kernel in turn, and each share's sum must outlive it). Fresh memory
# is not free: the operating system finds and zeroes every new page, 5-10 % of the time of
# the paper network's largest layers, and a product that writes into fresh pages waits for
# them (a 512-channel layer's backward pass on 8x8 maps: 42 ms with a fresh weight
# gradient, 19 ms with a reused one). So each thread keeps these buffers from call to call,
# each up to this size (larger ones are allocated and dropped each time): a bounded amount,
# held per thread.
SCRATCH_MAX_BYTES = 128 * 2**20
# Kernels smaller than this (multiply-adds of one product, about 1 ms on one core) run in
# the calling thread. Starting the shares costs about 0.1 ms for each of a convolution's
# three passes, and small layers gain less than that: the deep layers of a 16-channel U-Net
# on a 188x188 tile took two to four times as long in shares, and its training step 70 ms
# instead of 48 with every layer shared out.
SHARE_MIN_MULTIPLY_ADDS = 2**27
_scratch = threading.local()
# The tiles of _transposed: about this many bytes, read across while they are in cache.
TRANSPOSE_TILE_BYTES = 128 * 2**10
TRANSPOSE_TILE_COLUMNS = 1024


def _scratch_array(name: str, shape, dtype):
    """An array of ``shape`` and ``dtype`` with *undefined contents*, in this thread's reused
    buffer ``name`` (grown on demand; not kept beyond :data:`SCRATCH_MAX_BYTES`). The next
    request for ``name`` on this thread overwrites it: nothing may hold it after the call."""
    size, dtype = math.prod(shape), np.dtype(dtype)
    if size * dtype.itemsize > SCRATCH_MAX_BYTES:
        return np.empty(shape, dtype)
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.dtype != dtype or buffer.size < size:
        buffer = np.empty(size, dtype)
        setattr(_scratch, name, buffer)
    return buffer[:size].reshape(shape)


def _transposed(matrix):
    """``matrix.T`` (2-D) as a new C-contiguous array, copied one tile at a time.

    A plain copy of a transposed view reads the source a whole row apart for every element
    it writes; a tile of TRANSPOSE_TILE_BYTES (at most TRANSPOSE_TILE_COLUMNS wide) stays in
    cache while it is read across. Measured on weight-sized matrices: (4608, 512)
    16.7 -> 1.8 ms, (9216, 1024) 71 -> 10 ms, (262144, 9) 3.2 -> 1.0 ms.
    """
    rows, cols = matrix.shape
    out = np.empty((cols, rows), matrix.dtype)
    tile_cols = max(1, min(cols, TRANSPOSE_TILE_COLUMNS))
    tile_rows = max(1, TRANSPOSE_TILE_BYTES // (tile_cols * matrix.itemsize))
    for row in range(0, rows, tile_rows):
        for col in range(0, cols, tile_cols):
            out[col : col + tile_cols, row : row + tile_rows] = (
                matrix[row : row + tile_rows, col : col + tile_cols].T
            )
    return out


def _taps(weight):
    """(C_out, C_in, kH, kW) -> (kH*kW, C_out, C_in): one contiguous matrix per tap."""
    c_out, c_in, kh, kw = weight.shape
    return _transposed(weight.reshape(c_out * c_in, kh * kw)).reshape(kh * kw, c_out, c_in)


def _flipped_taps(weight):
    """The taps of the convolution that carries grad_out back onto the input (stride 1):
    its kernel is ``weight``'s turned by 180 degrees with input and output channels
    exchanged, so tap ``a*kW + b`` is ``weight[:, :, kH-1-a, kW-1-b].T`` (C_in, C_out).

    Turning the kernel reverses the order of the taps, and each tap is a transposed *view* of
    :func:`_taps`, which BLAS reads as it lies: no copy beyond that of ``_taps`` (a copy of
    the turned, transposed taps took 2.5 times as long: 30 ms for 1024x1024x3x3).
    """
    return _taps(weight)[::-1].transpose(0, 2, 1)


def _is_pointwise(geometry: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded convolution: the input already *is* its column matrix.

    With a 1x1 kernel and stride 1, equal input and output sizes mean no padding (and, for a
    transposed convolution, no output_padding).
    """
    one_by_one = geometry.kernel_size == (1, 1) and geometry.stride == (1, 1)
    return one_by_one and geometry.in_hw == geometry.out_hw


def _as_columns(block):
    """(n, C, R, W) -> (C, n*R*W): one column per pixel, ordered (image, row, column) as the
    columns of a block. A view for one image, a copy for several."""
    return block.swapaxes(0, 1).reshape(block.shape[1], -1)


def _matmul_into(a, b, out):
    """``out`` (n, M, R, W) = a (M, K) @ b (K, n*R*W), b's columns ordered as
    :func:`_as_columns`. For one image the product is written straight into ``out``."""
    if out.shape[0] == 1:
        np.matmul(a, b, out=out[0].reshape(out.shape[1], -1))
    else:
        out[...] = (a @ b).reshape(out.shape[1], out.shape[0], *out.shape[2:]).swapaxes(0, 1)


def _column_blocks(x, geometry: ConvGeometry, shares: int, gradient_columns: int = 0):
    """The blocks of im2col of x (N, C, H, W) for ``shares`` threads: ``(x_padded, blocks,
    size)``, where each block is ``(images, output rows, padded-input rows, block
    geometry)`` (see :func:`~minunet.functional.im2col.column_blocks`; one block per image,
    and None for the last two, where the input already is its column matrix) and ``size``
    the elements a block's columns take. ``gradient_columns``: the columns of the weight
    gradient that each block's product adds onto (0 for none), which sets the least width
    of a block (see PIXELS_PER_GRADIENT_COLUMN)."""
    if _is_pointwise(geometry):
        return x, [(slice(n, n + 1), slice(None), None, None) for n in range(x.shape[0])], 0
    pixels = max(BLOCK_PIXELS, PIXELS_PER_GRADIENT_COLUMN * gradient_columns)
    blocks, size = column_blocks(geometry, x.shape[0], x.shape[1], x.dtype, pixels,
                                 COLUMN_BUDGET_BYTES, shares, BLOCK_LEAST_BYTES)
    return pad2d(x, geometry.padding), blocks, size


def _columns(x_padded, geometry: ConvGeometry, blocks, size):
    """im2col of the ``blocks`` (from :func:`_column_blocks`), one at a time.

    Yields ``(images, rows, cols)``: the slices of the output that the block covers and its
    columns (C*kH*kW, n_images*rows*W_out), ordered as :func:`_as_columns`. Each block's
    columns overwrite the previous block's, in this thread's buffer: use them before asking
    for the next.
    """
    channels = x_padded.shape[1]
    if blocks and blocks[0][3] is None:  # pointwise: each image's pixels are its columns
        for images, rows, _, _ in blocks:
            yield images, rows, x_padded[images.start].reshape(channels, -1)
        return
    buffer = _scratch_array("columns", (size,), x_padded.dtype)
    column_rows = channels * math.prod(geometry.kernel_size)
    for images, out_rows, in_rows, block in blocks:
        count, pixels = images.stop - images.start, math.prod(block.out_hw)
        cols = buffer[: column_rows * count * pixels].reshape(column_rows, count, pixels)
        im2col(x_padded[images, :, in_rows], block, out=cols.transpose(1, 0, 2))
        yield images, out_rows, cols.reshape(column_rows, -1)


def _shares(multiply_adds: int) -> int:
    """How many shares to deal a kernel's work out to: as many as BLAS has threads, unless
    its products hold fewer than :data:`SHARE_MIN_MULTIPLY_ADDS` multiply-adds."""
    return share_count() if multiply_adds >= SHARE_MIN_MULTIPLY_ADDS else 1


def _in_shares(blocks, work, shares: int) -> list:
    """``work(share, run)`` for runs of consecutive ``blocks``, one run per share of the
    work, at once (:func:`~minunet.functional.threads.run_at_once`); the results in order.
    ``share`` numbers the runs: a thread may run several shares one after the other, so a
    share that returns a scratch array names it by its number."""
    runs = split(len(blocks), shares)
    return run_at_once(functools.partial(work, share, blocks[run])
                       for share, run in enumerate(runs))


def _split_by_rows(shares: int, *products) -> None:
    """Each of ``products``, a pair ``(rows, product)``, run as ``product(part)`` over parts
    of ``range(rows)``, one part per share of the work, all at once.

    One block cannot be shared out by blocks: its products are shared out by the rows of
    their results instead (the deepest levels' small maps, a single block, with the largest
    weights). Alone, such a layer runs faster on BLAS's own threads, which share one packed
    copy of the weights (forward on four 8x8 maps with 256 channels: 3.2 ms against 5.3 in
    two shares), but those threads keep spinning after the product and slow down every
    share of the kernels that follow. Over whole training steps it pays to share out all
    the work: the paper's network 5.47 -> 4.78 s, against 5.63 -> 5.14 s with only the maps
    of more than 32768 pixels shared out; the 32-channel network on four 128x128 tiles
    535 -> 508 ms, against 599 -> 659 ms with only the maps of more than 16384 pixels.
    """

    def work(share):
        for rows, product in products:
            parts = split(rows, shares)
            if share < len(parts):
                product(parts[share])

    run_at_once(functools.partial(work, share) for share in range(shares))


def _summed(partials):
    """The first of the arrays, with the others added into it."""
    total = partials[0]
    for partial in partials[1:]:
        total += partial
    return total


def _column_products(x, geometry: ConvGeometry, weight=None, grad_out=None):
    """The two products that read the columns of x, from one pass over them:
    ``(correlation, weight gradient)``, each None unless asked for.

    * with ``weight`` (C_out, C_in, kH, kW): the convolution of x without bias,
      (N, C_out, H_out, W_out) = ``weight (C_out, K) @ cols (K, L)``;
    * with ``grad_out`` (N, C_g, H_out, W_out): the weight gradient it gives,
      (C_g, C_in, kH, kW) = sum_n ``grad_out[n] (C_g, L) @ cols[n].T (L, K)``, computed as
      the transpose of ``cols[n] (K, L) @ grad_out[n].T (L, C_g)``: the same numbers, but
      OpenBLAS runs this orientation much faster when ``L`` is long.

    A transposed convolution's backward pass asks for both with the same columns. Each
    share of the blocks sums its own part of the weight gradient; the parts are added last.
    """
    out = None
    if weight is not None:
        weight_matrix = weight.reshape(weight.shape[0], -1)
        out = np.empty((x.shape[0], weight.shape[0], *geometry.out_hw), dtype=x.dtype)
    columns = x.shape[1] * math.prod(geometry.kernel_size)  # K, the rows of each block
    rows_out = weight.shape[0] if weight is not None else grad_out.shape[1]
    shares = _shares(x.shape[0] * math.prod(geometry.out_hw) * columns * rows_out)
    x_padded, blocks, size = _column_blocks(
        x, geometry, shares, 0 if grad_out is None else grad_out.shape[1])
    if grad_out is not None:
        gradient_shape = (columns, grad_out.shape[1])  # the weight gradient, transposed

    def work(share, run):
        transposed = None
        if grad_out is not None:
            transposed = _scratch_array(f"weight_gradient_{share}", gradient_shape, x.dtype)
        for index, (images, rows, cols) in enumerate(_columns(x_padded, geometry, run, size)):
            if out is not None:
                _matmul_into(weight_matrix, cols, out[images, :, rows])
            if transposed is not None:
                gemm(cols, _as_columns(grad_out[images, :, rows]).T, transposed,
                     accumulate=index > 0)
        return transposed

    if len(blocks) == 1 < shares:
        ((images, rows, cols),) = _columns(x_padded, geometry, blocks, size)
        products = []
        if out is not None:
            products.append((weight.shape[0], lambda part: _matmul_into(
                weight_matrix[part], cols, out[images, part, rows])))
        if grad_out is not None:
            partials = [_scratch_array("weight_gradient_0", gradient_shape, x.dtype)]
            grad_columns_t = _as_columns(grad_out[images, :, rows]).T
            products.append((columns, lambda part: gemm(
                cols[part], grad_columns_t, partials[0][part])))
        _split_by_rows(shares, *products)
    else:
        partials = _in_shares(blocks, work, shares)
    if grad_out is None:
        return out, None
    grad_weight = _transposed(_summed(partials))
    return out, grad_weight.reshape(grad_out.shape[1], x.shape[1], *geometry.kernel_size)


def _correlate(x, weight, geometry: ConvGeometry):
    """Convolution without bias: x (N, C_in, H, W), weight (C_out, C_in, kH, kW)
    -> (N, C_out, H_out, W_out), as ``weight (C_out, K) @ cols (K, L)``."""
    return _column_products(x, geometry, weight=weight)[0]


def _weight_gradient(grad_out, x, geometry: ConvGeometry):
    """grad_weight (C_out, C_in, kH, kW) = sum_n grad_out[n] (C_out, L) @ cols[n].T (L, K)."""
    return _column_products(x, geometry, grad_out=grad_out)[1]


def _shifted_products_pay(x, geometry: ConvGeometry) -> bool:
    """Whether :func:`_correlate_by_shifted_products` beats im2col for this convolution.

    It needs stride 1. It replaces the kH*kW copies of the input that im2col makes by
    kH*kW products of C_in rows each, which run at full speed from a few channels on; it
    also computes the junk columns of every padded row and image, so it loses where they are
    many (the deepest levels' tiny maps, which im2col serves better).
    """
    useful = math.prod(geometry.out_hw) / math.prod(geometry.padded_hw)
    return (geometry.stride == (1, 1) and x.shape[1] >= SHIFTED_MIN_CHANNELS
            and useful >= SHIFTED_MIN_USEFUL)


def _correlate_by_shifted_products(x, taps, geometry: ConvGeometry, bias=None):
    """A stride-1 convolution as kH*kW shifted products over the flattened padded input.

    Lay the padded images side by side, channel by channel, and flatten them:
    x_flat (C_in, N*H_pad*W_pad). Output pixel (n, i, j) sits at flat position
    ``p = n*H_pad*W_pad + i*W_pad + j``, and its tap (a, b) reads ``x_flat[:, p + shift]``
    with ``shift = a*d_h*W_pad + b*d_w``: the same shift for every pixel. Computing one
    output per flat position (those past the edge of an image are junk, dropped at the end),

        out_flat (C_out, N*H_pad*W_pad) = sum_{a,b} weight[:, :, a, b] (C_out, C_in)
                                              @ x_flat[:, shift(a, b) : shift(a, b) + length]

    every term reads a *window* of x_flat, and BLAS adds it straight onto the sum
    (:func:`~minunet.functional.blas.gemm`): no column matrix, no temporary. The sum runs
    over blocks of columns so that the block's partial sums stay in cache; the bias, where
    there is one, is added while the valid outputs are copied out (no pass of its own).
    ``taps`` (kH*kW, C_out, C_in) holds ``weight[:, :, a, b]`` at ``a*kW + b`` (:func:`_taps`).

    One unpadded image (the paper's valid convolutions, batch 1) already *is* x_flat:
    stopping at the last valid output, whose last tap reads the image's last pixel, no
    window runs past it, and the products read ``x`` itself instead of a copy.
    """
    (kh, kw), (dh, dw) = geometry.kernel_size, geometry.dilation
    (h_out, w_out), (h_pad, w_pad) = geometry.out_hw, geometry.padded_hw
    (top, _), (left, _) = geometry.padding
    batch, c_in, h, w = x.shape
    c_out = taps.shape[1]
    shifts = [a * dh * w_pad + b * dw for a in range(kh) for b in range(kw)]
    positions = batch * h_pad * w_pad
    shares = _shares(batch * h_out * w_out * c_in * kh * kw * c_out)
    if batch == 1 and (h_pad, w_pad) == (h, w):
        x_flat = x.reshape(c_in, h * w)  # a view when x is contiguous
        length = (h_out - 1) * w_pad + w_out  # flat positions beyond are junk, never read
    else:
        length = positions
        x_flat = _scratch_array("shifted_input", (c_in, length + shifts[-1]), x.dtype)

        def lay_out(channels):
            x_flat[channels, length:] = 0  # the last tap's window runs past the last image
            x_images = x_flat[channels, :length].reshape(-1, batch, h_pad, w_pad)
            x_images[:, :, :top] = 0  # the padding: zeros around each image
            x_images[:, :, top + h :] = 0
            x_images[:, :, top : top + h, :left] = 0
            x_images[:, :, top : top + h, left + w :] = 0
            x_images[:, :, top : top + h, left : left + w] = x[:, channels].transpose(1, 0, 2, 3)

        run_at_once(functools.partial(lay_out, c) for c in split(c_in, shares))
    out_flat = _scratch_array("shifted_output", (c_out, positions), x.dtype)
    fewest, most = SHIFTED_BLOCK_COLUMNS
    block = min(most, max(fewest, SHIFTED_BLOCK_BYTES // (c_out * x.dtype.itemsize)))
    # blocks of one size, as many for each share
    count = shares * math.ceil(length / (shares * block))
    block = math.ceil(length / count)
    starts = range(0, length, block)

    def products(run):
        for start in starts[run]:
            stop = min(start + block, length)
            for index, shift in enumerate(shifts):
                gemm(taps[index], x_flat[:, start + shift : stop + shift],
                     out_flat[:, start:stop], accumulate=index > 0)

    run_at_once(functools.partial(products, run) for run in split(len(starts), shares))
    out = np.empty((batch, c_out, h_out, w_out), dtype=x.dtype)  # never the scratch itself

    def copy_out(channels):
        valid = out_flat[channels].reshape(-1, batch, h_pad, w_pad)[:, :, :h_out, :w_out]
        if bias is None:
            out[:, channels] = valid.swapaxes(0, 1)
        else:  # the copy out of the flat layout adds the bias on the way
            np.add(valid.swapaxes(0, 1), bias[channels, None, None], out=out[:, channels])

    run_at_once(functools.partial(copy_out, c) for c in split(c_out, shares))
    return out


def _input_gradient(grad_out, weight, geometry: ConvGeometry):
    """grad_x (N, C_in, H, W) = col2im(weight.T (K, C_out) @ grad_out (C_out, L)).

    This one function is both the input gradient of :func:`conv2d` (where
    :func:`_gradients_from_gradient_columns` does not apply) and the forward pass of
    :func:`~minunet.functional.conv_transpose2d`.
    """
    batch, c_out = grad_out.shape[:2]
    c_in = weight.shape[1]
    weight_matrix_t = weight.reshape(c_out, -1).T
    if _is_pointwise(geometry):
        grad_x = np.matmul(weight_matrix_t, grad_out.reshape(batch, c_out, -1))
        return grad_x.reshape(batch, c_in, *geometry.in_hw)
    # where the taps tile the input each pixel receives one value: written, not added to zeros
    tiled = tiles(geometry)
    grad_x_pad = (np.empty if tiled else np.zeros)(
        (batch, c_in, *geometry.padded_hw), dtype=grad_out.dtype
    )
    column_rows = weight_matrix_t.shape[0]
    shares = _shares(batch * math.prod(geometry.out_hw) * c_out * column_rows)
    # blocks that add onto each other's rows run on one thread (below): no need to even them
    blocks, size = column_blocks(geometry, batch, c_in, grad_out.dtype, BLOCK_PIXELS,
                                 COLUMN_BUDGET_BYTES, shares if tiled else 1, BLOCK_LEAST_BYTES)

    def work(share, run):
        buffer = _scratch_array("columns", (size,), grad_out.dtype)
        for images, out_rows, in_rows, block in run:
            count, pixels = images.stop - images.start, math.prod(block.out_hw)
            grad_cols = buffer[: column_rows * count * pixels].reshape(column_rows, -1)
            np.matmul(weight_matrix_t, _as_columns(grad_out[images, :, out_rows]),
                      out=grad_cols)
            col2im(grad_cols.reshape(column_rows, count, pixels).transpose(1, 0, 2), block,
                   out=grad_x_pad[images, :, in_rows], overwrite=tiled)

    if len(blocks) == 1 < shares:  # one block, shared out by input channels
        ((images, out_rows, in_rows, block),) = blocks
        count, pixels = images.stop - images.start, math.prod(block.out_hw)
        taps = math.prod(geometry.kernel_size)
        grad_columns = _as_columns(grad_out[images, :, out_rows])
        buffer = _scratch_array("columns", (size,), grad_out.dtype)
        grad_cols = buffer[: column_rows * count * pixels].reshape(column_rows, -1)

        def by_channels(channels):
            part = slice(channels.start * taps, channels.stop * taps)
            np.matmul(weight_matrix_t[part], grad_columns, out=grad_cols[part])
            col2im(grad_cols[part].reshape(-1, count, pixels).transpose(1, 0, 2), block,
                   out=grad_x_pad[images, channels, in_rows], overwrite=tiled)

        _split_by_rows(shares, (c_in, by_channels))
    elif tiled:  # the blocks write disjoint rows: shares may run at once
        _in_shares(blocks, work, shares)
    else:  # neighbouring blocks add onto the same rows
        work(0, blocks)
    return crop2d(grad_x_pad, geometry)


def _gradient_geometry(geometry: ConvGeometry) -> ConvGeometry | None:
    """The geometry of the "full" correlation that carries grad_out back onto the input grid.

    For stride 1, padding grad_out (H_out, W_out) by ``d*(k-1) - p`` on each side makes its
    correlation with the flipped kernel land exactly on the input (H, W). Returns None where
    the stride is not 1 or that padding would be negative (a convolution padded by more than
    ``d*(k-1)``).
    """
    if geometry.stride != (1, 1):
        return None
    padding = tuple(
        (d * (k - 1) - before, d * (k - 1) - after)
        for k, d, (before, after) in zip(
            geometry.kernel_size, geometry.dilation, geometry.padding, strict=True
        )
    )
    if min(min(side) for side in padding) < 0:
        return None
    return geometry._replace(padding=padding, in_hw=geometry.out_hw, out_hw=geometry.in_hw)


def _flipped_rows(weight):
    """(C_out, C_in, kH, kW) -> (C_out*kH*kW, C_in), row ``(o, a, b)`` holding
    ``weight[o, :, kH-1-a, kW-1-b]``: the kernel turned by 180 degrees, rows in the order of
    the gradient columns. Its transpose, a view that BLAS reads as it lies, is the matrix
    of the convolution that carries grad_out back onto the input. Built this way round the
    copy moves runs of C_in numbers instead of runs of kH*kW: half the time (512x512x3x3:
    1.8 -> 0.9 ms; 1024x1024x3x3: 23 -> 11 ms)."""
    c_out, c_in, kh, kw = weight.shape
    by_tap = weight.reshape(c_out, c_in, kh * kw).transpose(0, 2, 1)[:, ::-1]
    return np.ascontiguousarray(by_tap).reshape(c_out * kh * kw, c_in)


def _gradients_from_gradient_columns(grad_out, x, weight, carried_back: ConvGeometry):
    """(grad_x, grad_weight) of a stride-1 convolution from one im2col of grad_out.

    ``gcols = im2col(grad_out padded by d*(k-1) - p)`` has rows (o, a', b') and one column
    per *input* pixel q, holding ``grad_out[o, q - tap(a', b')]`` (zero outside). Both
    gradients are then single products with the same columns:

        grad_x[n]  (C_in, L_in)          = flip(weight).T (C_in, C_out*kH*kW) @ gcols[n]
        grad_w'    (C_out*kH*kW, C_in)   = sum_n gcols[n] @ x[n].T (L_in, C_in)

    where ``flip`` turns the kernel by 180 degrees and ``grad_w'`` is the weight gradient
    with its kernel flipped too. The input gradient is a convolution of grad_out with the
    flipped kernel (no col2im, whose scattered additions are slow), and the weight gradient
    reads ``x`` itself instead of a second im2col of it. ``carried_back`` is
    :func:`_gradient_geometry` of the convolution.
    """
    c_out, c_in, kh, kw = weight.shape
    flipped_matrix_t = _flipped_rows(weight).T  # (C_in, C_out*kH*kW), a transposed view
    grad_x = np.empty_like(x)
    shares = _shares(x.shape[0] * math.prod(x.shape[2:]) * c_out * kh * kw * c_in)
    grad_out_padded, blocks, size = _column_blocks(grad_out, carried_back, shares, c_in)

    def work(share, run):
        grad_w_flipped = _scratch_array(f"weight_gradient_{share}", (c_out * kh * kw, c_in),
                                        x.dtype)
        for index, (images, rows, gcols) in enumerate(
                _columns(grad_out_padded, carried_back, run, size)):
            _matmul_into(flipped_matrix_t, gcols, grad_x[images, :, rows])
            gemm(gcols, _as_columns(x[images, :, rows]).T, grad_w_flipped,
                 accumulate=index > 0)
        return grad_w_flipped

    if len(blocks) == 1 < shares:
        ((images, rows, gcols),) = _columns(grad_out_padded, carried_back, blocks, size)
        grad_w_flipped = _scratch_array("weight_gradient_0", (c_out * kh * kw, c_in), x.dtype)
        x_columns_t = _as_columns(x[images, :, rows]).T
        _split_by_rows(
            shares,
            (c_in, lambda part: _matmul_into(flipped_matrix_t[part], gcols,
                                             grad_x[images, part, rows])),
            (c_out * kh * kw, lambda part: gemm(gcols[part], x_columns_t,
                                                grad_w_flipped[part])),
        )
    else:
        grad_w_flipped = _summed(_in_shares(blocks, work, shares))
    grad_w = grad_w_flipped.reshape(c_out, kh, kw, c_in)[:, ::-1, ::-1].transpose(0, 3, 1, 2)
    return grad_x, np.ascontiguousarray(grad_w)


@dispatch_on_array_type
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, PyTorch's ``conv2d``), vectorised with im2col.

    Args:
        x: (N, C_in, H, W), float32 or float64.
        weight: (C_out, C_in, kH, kW), same dtype as ``x``.
        bias: (C_out,) or None.
        stride, dilation: int or (rows, cols), positive.
        padding: int or (rows, cols) (zeros on both sides), ``"valid"`` (none), ``"same"``
            (stride 1 only; output size = input size; an odd total puts the extra pixel
            bottom/right, as PyTorch) or ``"full"`` (``d*(k-1)`` on every side).

    Returns:
        (N, C_out, H_out, W_out), where
        ``H_out = floor((H + p_top + p_bottom - d_h*(kH-1) - 1) / s_h) + 1`` and

        out[n, o, i, j] = bias[o]
                      + sum_{c, a, b} weight[o, c, a, b] * x_pad[n, c, i*s_h + a*d_h, j*s_w + b*d_w]
    """
    geometry = conv2d_arguments(x, weight, bias, stride, padding, dilation)
    if _shifted_products_pay(x, geometry):
        return _correlate_by_shifted_products(x, _taps(weight), geometry, bias)
    out = _correlate(x, weight, geometry)
    if bias is not None:
        out += bias[:, None, None]
    return out


@dispatch_on_array_type
def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, *,
                    input_gradient=True):
    """Gradients of :func:`conv2d`, given the upstream gradient grad_out (N, C_out, H_out, W_out).

    Returns ``(grad_x, grad_weight, grad_bias)`` with the shapes of ``x``, ``weight`` and
    the bias (C_out,):

    * grad_weight = sum_n grad_out[n] @ im2col(x)[n].T  (a convolution of x with grad_out)
    * grad_x      = col2im(weight.T @ grad_out)        (the transposed convolution of grad_out)
    * grad_bias   = grad_out summed over n, i, j

    With ``input_gradient=False`` grad_x is not computed and is None: a network's first
    layer, whose input is the data, needs only its parameters' gradients.
    """
    geometry = conv2d_arguments(x, weight, None, stride, padding, dilation)
    check_grad_out(grad_out, (x.shape[0], weight.shape[0], *geometry.out_hw), x)
    c_out, c_in = weight.shape[:2]
    carried_back = _gradient_geometry(geometry)
    if not input_gradient:
        grad_x, grad_weight = None, _weight_gradient(grad_out, x, geometry)
    elif (carried_back is not None and c_out > c_in >= SHIFTED_MIN_CHANNELS
            and _shifted_products_pay(grad_out, carried_back)):
        # More output than input channels: grad_out reaches the input grid by shifted
        # products (the flipped kernel's convolution), and the weight gradient uses the
        # columns of x, the smaller ones. Each product has a row per input channel: with
        # the first layer's single one it is a sliver, slower than col2im (the paper's
        # first layer, backward on one thread: 113 ms that way, 50 ms by col2im).
        grad_x = _correlate_by_shifted_products(grad_out, _flipped_taps(weight), carried_back)
        grad_weight = _weight_gradient(grad_out, x, geometry)
    elif carried_back is not None and c_out <= 2 * c_in:
        # One im2col of grad_out serves both products, each with K = C_out*kH*kW. With as
        # many output as input channels these columns are as large as x's, which the
        # shifted route builds for its weight gradient anyway, on top of its own flat
        # arrays: the 32-channel layer on four 128x128 maps 27.4 -> 22.2 ms, on 16x16 maps
        # with 256 channels 18.5 -> 13.8 ms (the paper's layers within a few percent).
        grad_x, grad_weight = _gradients_from_gradient_columns(grad_out, x, weight, carried_back)
    else:
        grad_x = _input_gradient(grad_out, weight, geometry)
        grad_weight = _weight_gradient(grad_out, x, geometry)
    return grad_x, grad_weight, grad_out.sum(axis=(0, 2, 3))
