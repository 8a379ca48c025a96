"""2-D max-pooling and its gradient.

    out[n, c, i, j] = max_{a < kH, b < kW} x_pad[n, c, i*s_h + a, j*s_w + b]

where ``x_pad`` is ``x`` padded with ``-inf`` (so padding never wins), and the output size is
that of a convolution: ``H_out = floor((H + 2*p_h - kH) / s_h) + 1``.

**Tie rule.** The gradient of a maximum flows to the input that produced it. When several
pixels of a window share the maximum, the *first* of them in row-major window order
(smallest ``a``, then smallest ``b``) receives the whole gradient, and the others none. This
is what PyTorch's CPU kernel does; it keeps the gradient's total equal to ``grad_out``'s.

**NaN.** A window holding NaN has the maximum NaN, and its gradient goes to the *last* NaN
in row-major window order: PyTorch's kernels keep a running maximum that every NaN replaces.
Inputs are assumed to be free of ``-inf`` (which could tie with the padding).
"""

from __future__ import annotations

import functools

import numpy as np

from minunet.checks import (
    ConvGeometry,
    check_grad_out,
    max_pool2d_arguments,
)
from minunet.functional._dispatch import dispatch_on_array_type
from minunet.functional.im2col import crop2d, pad2d, receptive_field, tap
from minunet.functional.threads import pass_shares, run_at_once, split

# --- Reference kernels ----------------------------------------------------------------------


def max_pool2d_reference(x, kernel_size, stride=None, padding=0):
    """Max-pooling with explicit loops: x (N, C, H, W) -> (N, C, H_out, W_out),
    ``out[n, c, i, j] = max(x_pad[n, c, window(i, j)])``. Arguments as :func:`max_pool2d`."""
    geometry = max_pool2d_arguments(x, kernel_size, stride, padding)
    x_pad = pad2d(x, geometry.padding, -np.inf)
    out = np.empty((*x.shape[:2], *geometry.out_hw), dtype=x.dtype)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(geometry.out_hw[0]):
                for j in range(geometry.out_hw[1]):
                    rows, cols = receptive_field(i, j, geometry)
                    out[n, c, i, j] = x_pad[n, c, rows, cols].max()
    return out


def max_pool2d_backward_reference(grad_out, x, kernel_size, stride=None, padding=0):
    """Gradient of :func:`max_pool2d_reference`: grad_out (N, C, H_out, W_out) -> grad_x
    (N, C, H, W). Each window's gradient goes to its first maximum (``np.argmax`` returns the
    first one in row-major order), or to its last NaN if it holds any."""
    geometry = max_pool2d_arguments(x, kernel_size, stride, padding)
    check_grad_out(grad_out, (*x.shape[:2], *geometry.out_hw), x)
    x_pad = pad2d(x, geometry.padding, -np.inf)
    grad_x_pad = np.zeros_like(x_pad)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(geometry.out_hw[0]):
                for j in range(geometry.out_hw[1]):
                    rows, cols = receptive_field(i, j, geometry)
                    window = x_pad[n, c, rows, cols]
                    nans = np.flatnonzero(np.isnan(window))
                    winner = nans[-1] if nans.size else np.argmax(window)
                    a, b = np.unravel_index(winner, window.shape)
                    grad_x_pad[n, c, rows.start + a, cols.start + b] += grad_out[n, c, i, j]
    return crop2d(grad_x_pad, geometry)


# --- Fast kernels: a loop over the kH*kW taps of the window ---------------------------------


def _taps(geometry: ConvGeometry):
    """Kernel taps ``(a, b)`` in row-major window order, the order of the tie rule."""
    kh, kw = geometry.kernel_size
    return [(a, b) for a in range(kh) for b in range(kw)]


def _pool(x_pad, geometry: ConvGeometry, *, track_winner: bool, out=None):
    """Running maximum over the taps, and (if ``track_winner``) which tap won:
    (N, C, H_pad, W_pad) -> (out, winner), both (N, C, H_out, W_out), ``winner = a*kW + b``
    of the first tap in row-major window order that attains the maximum, or of the last NaN
    (else ``None``). The maxima go into ``out`` when given."""
    first, *rest = _taps(geometry)
    if out is None:
        out = tap(x_pad, *first, geometry).copy()
    else:
        out[...] = tap(x_pad, *first, geometry)
    taps_dtype = np.min_scalar_type(len(rest))  # uint8 for kernels up to 16x16: less traffic
    winner = np.zeros(out.shape, dtype=taps_dtype) if track_winner else None
    # NaN never compares greater, so a NaN tap must be told to win; checked only when needed
    has_nan = track_winner and bool(np.isnan(x_pad).any())
    for index, (a, b) in enumerate(rest, start=1):
        candidate = tap(x_pad, a, b, geometry)
        if track_winner:  # strictly greater: on a tie the earlier tap keeps the win
            wins = candidate > out
            if has_nan:
                wins |= np.isnan(candidate)
            winner += (index - winner) * wins  # arithmetic beats masked copies
        np.maximum(out, candidate, out=out)
    return out, winner


def _flat_indices(winner, geometry: ConvGeometry, out):
    """Tap indices -> PyTorch's indices, written into ``out`` (int64): flat positions
    ``row*W + col`` in the unpadded input.

    Output pixel ``(i, j)`` and tap ``(a, b)`` read input pixel
    ``(i*s_h + a - top, j*s_w + b - left)``: a per-pixel part plus a per-tap offset.
    """
    (sh, sw), ((top, _), (left, _)) = geometry.stride, geometry.padding
    (h_out, w_out), width = geometry.out_hw, geometry.in_hw[1]
    window_corner = (np.arange(h_out)[:, None] * sh - top) * width + (np.arange(w_out) * sw - left)
    tap_offset = np.array([a * width + b for a, b in _taps(geometry)], dtype=np.int64)
    np.add(window_corner, tap_offset[winner], out=out)


@dispatch_on_array_type
def max_pool2d(x, kernel_size, stride=None, padding=0, return_indices=False):
    """2-D max-pooling (PyTorch's ``max_pool2d``, floor mode).

    Args:
        x: (N, C, H, W), float32 or float64.
        kernel_size: int or (rows, cols).
        stride: int or (rows, cols); ``None`` (default) means ``kernel_size``.
        padding: int or (rows, cols), at most half the kernel; pads with ``-inf``.
        return_indices: also return, for every output pixel, the flat position
            ``row*W + col`` in ``x`` of the pixel that won (first maximum in row-major
            window order), as PyTorch does; pass them to :func:`max_pool2d_backward` to skip
            recomputing the maxima.

    Returns:
        out (N, C, H_out, W_out) with ``H_out = floor((H + 2*p_h - kH) / s_h) + 1``, and
        ``indices`` (int64, same shape) when ``return_indices`` is true.
    """
    geometry = max_pool2d_arguments(x, kernel_size, stride, padding)
    x_pad = pad2d(x, geometry.padding, -np.inf)
    out = np.empty((*x.shape[:2], *geometry.out_hw), dtype=x.dtype)
    indices = np.empty(out.shape, dtype=np.int64) if return_indices else None

    def pool(channels):  # the channels are independent: shared out to threads
        _, winner = _pool(x_pad[:, channels], geometry, track_winner=return_indices,
                          out=out[:, channels])
        if return_indices:
            _flat_indices(winner, geometry, out=indices[:, channels])

    shares = pass_shares(x.size)
    run_at_once(functools.partial(pool, c) for c in split(x.shape[1], shares))
    return (out, indices) if return_indices else out


@dispatch_on_array_type
def max_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0, indices=None):
    """Gradient of :func:`max_pool2d`: grad_out (N, C, H_out, W_out) -> grad_x (N, C, H, W).

    Each window's upstream gradient goes entirely to its first maximum in row-major window
    order (the tie rule of the module docstring); a pixel that wins several overlapping
    windows receives the sum. ``indices``, as returned by ``max_pool2d(...,
    return_indices=True)``, saves recomputing the winners.
    """
    geometry = max_pool2d_arguments(x, kernel_size, stride, padding)
    check_grad_out(grad_out, (*x.shape[:2], *geometry.out_hw), x)
    if indices is not None:
        disjoint = all(s >= k for s, k in zip(geometry.stride, geometry.kernel_size,
                                              strict=True))
        return _scatter_to_indices(grad_out, indices, x.shape, disjoint)
    x_pad = pad2d(x, geometry.padding, -np.inf)
    _, winner = _pool(x_pad, geometry, track_winner=True)
    grad_x_pad = np.zeros_like(x_pad)
    for index, (a, b) in enumerate(_taps(geometry)):
        # += because with overlapping windows a pixel may win several of them
        tap(grad_x_pad, a, b, geometry)[...] += np.where(winner == index, grad_out, 0)
    return crop2d(grad_x_pad, geometry)


def _scatter_to_indices(grad_out, indices, x_shape, disjoint: bool):
    """grad_x[n, c].flat[indices[n, c, i, j]] += grad_out[n, c, i, j].

    Where the windows do not overlap (``disjoint``: the U-Net's 2x2 pool, stride 2) no
    pixel wins twice, so each receives its value by plain assignment, the planes shared out
    to threads. Overlapping windows need ``np.add.at``, which gains little from threads:
    the paper's first pool (64x568x568) took 38 ms with it on one thread, 30 ms on two, and
    17 ms by assignment on two.
    """
    if tuple(indices.shape) != tuple(grad_out.shape) or indices.dtype.kind not in "iu":
        raise ValueError(
            f"indices must be the integer array returned by max_pool2d(..., "
            f"return_indices=True), of shape {tuple(grad_out.shape)}; got "
            f"{indices.dtype} of shape {tuple(indices.shape)}"
        )
    planes, plane_size = x_shape[0] * x_shape[1], x_shape[2] * x_shape[3]
    grad_x = np.zeros((planes, plane_size), dtype=grad_out.dtype)
    grad_planes, index_planes = grad_out.reshape(planes, -1), indices.reshape(planes, -1)

    def scatter(run):
        # indices count within one (n, c) plane; offset them into the run's flat gradient
        plane_start = np.arange(0, (run.stop - run.start) * plane_size, plane_size)[:, None]
        flat_indices = (index_planes[run] + plane_start).ravel()
        if disjoint:
            grad_x[run].reshape(-1)[flat_indices] = grad_planes[run].ravel()
        else:  # a pixel may win several windows: its values are summed
            np.add.at(grad_x[run].reshape(-1), flat_indices, grad_planes[run].ravel())

    shares = pass_shares(grad_x.size) if disjoint else 1
    run_at_once(functools.partial(scatter, run) for run in split(planes, shares))
    return grad_x.reshape(x_shape)
