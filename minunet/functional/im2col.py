"""im2col and col2im: a convolution as one matrix product.

A convolution reads, for every output pixel ``(i, j)`` and kernel tap ``(a, b)``, the input
pixel ``(i*s_h + a*d_h, j*s_w + b*d_w)`` of the padded input. :func:`im2col` copies these
pixels into a matrix with one row per (channel, tap) and one column per output pixel,

    cols[n, (c, a, b), (i, j)] = x_padded[n, c, i*s_h + a*d_h, j*s_w + b*d_w],

so that the convolution becomes ``weight.reshape(C_out, C_in*kH*kW) @ cols``. Instead of
looping over output pixels, both functions loop over the ``kH*kW`` taps: for a fixed tap the
pixels it reads form one strided slice of the input (:func:`tap`).

:func:`col2im` is the adjoint (transpose) of :func:`im2col`: it adds every entry of a column
matrix back onto the pixel it was read from. Pixels read by several taps receive the sum,
which is exactly what the chain rule asks of a gradient.
"""

from __future__ import annotations

import numpy as np

from minunet.checks import ConvGeometry
from minunet.functional.threads import split


def tap(x, a: int, b: int, geometry: ConvGeometry):
    """The strided view of the padded ``x`` (..., H_pad, W_pad) that kernel tap ``(a, b)``
    reads at every output pixel: shape (..., H_out, W_out)."""
    (sh, sw), (dh, dw), (h_out, w_out) = geometry.stride, geometry.dilation, geometry.out_hw
    rows = slice(a * dh, a * dh + sh * (h_out - 1) + 1, sh)
    cols = slice(b * dw, b * dw + sw * (w_out - 1) + 1, sw)
    return x[..., rows, cols]


def receptive_field(i: int, j: int, geometry: ConvGeometry) -> tuple[slice, slice]:
    """The (rows, cols) slices of the padded input that output pixel ``(i, j)`` reads: its
    ``kH x kW`` window, dilated. Where :func:`tap` fixes a tap and varies the output pixel,
    this fixes the output pixel and varies the tap (the reference kernels loop this way)."""
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.dilation
    return (
        slice(i * sh, i * sh + dh * (kh - 1) + 1, dh),
        slice(j * sw, j * sw + dw * (kw - 1) + 1, dw),
    )


def pad2d(x, padding, value=0.0):
    """Pad the last two axes by ``padding = ((top, bottom), (left, right))`` with ``value``.

    Returns ``x`` itself (not a copy) when there is nothing to pad; callers never write to it.
    The same as ``np.pad(x, ((0, 0), (0, 0), *padding), constant_values=value)``, written
    as five slice assignments: np.pad spends about 15 microseconds in Python per call, which
    on the deep levels' small maps was a third of a backward pass's fixed cost.
    """
    if not any(padding[0] + padding[1]):
        return x
    (top, bottom), (left, right) = padding
    *leading, h, w = x.shape
    out = np.empty((*leading, h + top + bottom, w + left + right), dtype=x.dtype)
    out[..., top : top + h, left : left + w] = x
    out[..., :top, :] = value
    out[..., top + h :, :] = value
    out[..., top : top + h, :left] = value
    out[..., top : top + h, left + w :] = value
    return out


def crop2d(x_padded, geometry: ConvGeometry):
    """Undo :func:`pad2d`: the contiguous (N, C, H, W) interior of a padded array."""
    (top, _), (left, _) = geometry.padding
    h, w = geometry.in_hw
    if x_padded.shape[2:] == (h, w):
        return x_padded
    return np.ascontiguousarray(x_padded[:, :, top : top + h, left : left + w])


def im2col(x_padded, geometry: ConvGeometry, out=None):
    """(N, C, H_pad, W_pad) -> cols (N, C*kH*kW, H_out*W_out), one contiguous copy.

    ``out``, an (N, C*kH*kW, H_out*W_out) array whose last axis is contiguous (a view into a
    reused buffer, possibly with its first two axes swapped), receives the columns instead
    of fresh memory.
    """
    n, c = x_padded.shape[:2]
    (kh, kw), (h_out, w_out) = geometry.kernel_size, geometry.out_hw
    if out is None:
        out = np.empty((n, c * kh * kw, h_out * w_out), dtype=x_padded.dtype)
    cols = out.reshape(n, c, kh, kw, h_out, w_out)  # splitting axes: always a view
    for a in range(kh):
        for b in range(kw):
            cols[:, :, a, b] = tap(x_padded, a, b, geometry)
    return out


def col2im(cols, geometry: ConvGeometry, out=None, overwrite=False):
    """cols (N, C*kH*kW, H_out*W_out) -> (N, C, H_pad, W_pad), the adjoint of :func:`im2col`:
    ``x_padded[n, c, i*s_h + a*d_h, j*s_w + b*d_w] += cols[n, (c, a, b), (i, j)]``.

    The sums go into ``out`` (a padded array, or a view of one) when given, else into zeros.
    ``overwrite=True`` writes each tap's values instead of adding them: right only where the
    taps tile ``out`` (:func:`tiles`), each pixel read by exactly one tap of one window,
    and then ``out`` need not be zeroed first.
    """
    (kh, kw), (h_out, w_out) = geometry.kernel_size, geometry.out_hw
    n = cols.shape[0]
    c = cols.shape[1] // (kh * kw)
    cols = cols.reshape(n, c, kh, kw, h_out, w_out)
    if out is None:
        out = np.zeros((n, c, *geometry.padded_hw), dtype=cols.dtype)
    for a in range(kh):
        for b in range(kw):
            if overwrite:
                tap(out, a, b, geometry)[...] = cols[:, :, a, b]
            else:
                tap(out, a, b, geometry)[...] += cols[:, :, a, b]
    return out


def tiles(geometry: ConvGeometry) -> bool:
    """Whether the windows tile the padded input: stride equal to the (undilated) kernel and
    a padded size that is a whole number of windows, so that every padded pixel is read by
    exactly one tap of one window (the U-Net's 2x2, stride-2 up-convolution)."""
    (kh, kw), (h_out, w_out) = geometry.kernel_size, geometry.out_hw
    return (geometry.stride == geometry.kernel_size and geometry.dilation == (1, 1)
            and geometry.padded_hw == (h_out * kh, w_out * kw))


def column_blocks(geometry: ConvGeometry, batch: int, channels: int, dtype,
                  block_pixels: int, budget_bytes: int, parts: int = 1, least_bytes: int = 0):
    """Split the output pixels into blocks for im2col: whole images when an image has fewer
    than a block's pixels, else bands of whole output rows.

    A block holds at most about ``block_pixels`` output pixels (so its column matrix is wide
    enough for a fast matrix product), or as many as make ``least_bytes`` of columns where
    that is more (a few rows of columns, as a first layer's one input channel makes, are
    filled and multiplied so fast that each block's fixed cost would dominate), but never
    more than ``budget_bytes`` of columns (``C*kH*kW`` rows), and at least one row.

    The blocks are of one size, give or take an image or a row, and where an image (or the
    batch) takes several their number is rounded up to a multiple of ``parts`` (as far as
    the rows or images go): dealt out to ``parts`` threads in equal runs of consecutive
    blocks, each thread gets the same work. (Three bands of 18 rows on two threads would
    leave one idle for a third of the time: the backward pass of the paper's 512-channel
    layer on 54x54 maps took 151 ms in those bands, 127 ms in four of 14 and 13 rows.)

    Returns ``(blocks, size)``: a list of ``(images, output rows, padded-input rows, block
    geometry)`` (slices, and the geometry of the block as seen by :func:`im2col` and
    :func:`col2im`: only its kernel, stride, dilation and ``out_hw`` are meaningful), and
    the number of elements that holds the columns of any one block.
    """
    (kh, kw), (h_out, w_out) = geometry.kernel_size, geometry.out_hw
    column_bytes = channels * kh * kw * np.dtype(dtype).itemsize
    pixels = min(max(block_pixels, least_bytes // column_bytes), budget_bytes // column_bytes)
    image_runs = _equal_runs(batch, max(1, pixels // (h_out * w_out)), parts)
    row_runs = _equal_runs(h_out, max(1, pixels // w_out), parts)
    blocks = []
    for images in image_runs:
        for rows in row_runs:
            first_rows, _ = receptive_field(rows.start, 0, geometry)
            last_rows, _ = receptive_field(rows.stop - 1, 0, geometry)
            blocks.append((images, rows, slice(first_rows.start, last_rows.stop),
                           geometry._replace(out_hw=(rows.stop - rows.start, w_out))))
    images, rows = (max(run.stop - run.start for run in runs)
                    for runs in (image_runs, row_runs))
    return blocks, images * rows * w_out * channels * kh * kw


def _equal_runs(total: int, most: int, parts: int) -> list[slice]:
    """``range(total)`` in as few runs of at most ``most`` as a multiple of ``parts`` allows
    (one run where one is enough), of lengths within one of each other."""
    count = -(-total // most)
    if count > 1:
        count = parts * -(-count // parts)
    return split(total, count)
