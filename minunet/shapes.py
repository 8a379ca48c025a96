"""All shape arithmetic of minunet, in one place.

Every output size in the package is computed here, and nowhere else. The equations are the
ones of Dumoulin & Visin, "A guide to convolution arithmetic for deep learning" (2016), in
PyTorch's conventions (``dilation=1`` means no dilation):

* convolution:            ``H_out = floor((H + p_top + p_bottom - d*(k-1) - 1) / s) + 1``
* transposed convolution: ``H_out = (H - 1)*s - 2*p + d*(k-1) + output_padding + 1``
* max-pooling:            as convolution, with ``d = 1``.

Padding is carried around as ``((top, bottom), (left, right))`` so that the asymmetric
``"same"`` padding of an even kernel (the extra pixel goes bottom/right, as in PyTorch and
TensorFlow) needs no special case downstream.
"""

from __future__ import annotations

import numbers

Pair = tuple[int, int]
Padding2d = tuple[Pair, Pair]


def pair(value, name: str, *, minimum: int | None = None) -> Pair:
    """Turn an int or a pair of ints into ``(rows, cols)``, checking it on the way.

    ``minimum`` is the smallest allowed value; the error names ``name``.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        result = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        result = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if minimum is not None and min(result) < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return result


def dilated_kernel_size(kernel: int, dilation: int) -> int:
    """The extent covered by a kernel of ``kernel`` taps spaced ``dilation`` apart."""
    return dilation * (kernel - 1) + 1


def resolve_padding(padding, kernel_size: Pair, stride: Pair, dilation: Pair) -> Padding2d:
    """Turn ``padding`` (int, pair, ``"valid"``, ``"same"`` or ``"full"``) into
    ``((top, bottom), (left, right))``.

    * ``"valid"``: no padding; the kernel only visits positions where it fits entirely.
    * ``"same"``: stride 1 only; output size = input size. The total padding ``d*(k-1)`` is
      split with the odd pixel at the bottom/right, as PyTorch does.
    * ``"full"``: ``d*(k-1)`` on every side: every partial overlap is kept (MATLAB's ``conv2``).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        totals = [dilated_kernel_size(k, d) - 1 for k, d in zip(kernel_size, dilation, strict=True)]
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            return tuple((t // 2, t - t // 2) for t in totals)  # type: ignore[return-value]
        if padding == "full":
            return tuple((t, t) for t in totals)  # type: ignore[return-value]
        raise ValueError(
            f"padding must be an int, a pair of ints, 'valid', 'same' or 'full', got {padding!r}"
        )
    ph, pw = pair(padding, "padding", minimum=0)
    return ((ph, ph), (pw, pw))


def conv_output_size(size: int, kernel: int, stride: int, pad: Pair, dilation: int) -> int:
    """Output length of a convolution along one axis, with padding ``pad = (before, after)``.

    Returns a value < 1 when the dilated kernel does not fit in the padded input; callers
    turn that into an error that names the argument.
    """
    padded = size + pad[0] + pad[1]
    return (padded - dilated_kernel_size(kernel, dilation)) // stride + 1


def conv2d_output_shape(
    in_hw: Pair, kernel_size: Pair, stride: Pair, padding: Padding2d, dilation: Pair
) -> Pair:
    """``(H_out, W_out)`` of a 2-D convolution (see :func:`conv_output_size`)."""
    return tuple(  # type: ignore[return-value]
        conv_output_size(n, k, s, p, d)
        for n, k, s, p, d in zip(in_hw, kernel_size, stride, padding, dilation, strict=True)
    )


def conv_transpose_output_size(
    size: int, kernel: int, stride: int, padding: int, output_padding: int, dilation: int
) -> int:
    """Output length of a transposed convolution along one axis.

    It is the input length of the convolution whose gradient this transposed convolution is;
    ``output_padding`` picks among the several input sizes that a strided convolution maps to
    the same output size.
    """
    extent = dilated_kernel_size(kernel, dilation)
    return (size - 1) * stride - 2 * padding + extent + output_padding


def conv_transpose2d_output_shape(
    in_hw: Pair,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    output_padding: Pair,
    dilation: Pair,
) -> Pair:
    """``(H_out, W_out)`` of a 2-D transposed convolution."""
    return tuple(  # type: ignore[return-value]
        conv_transpose_output_size(n, k, s, p, op, d)
        for n, k, s, p, op, d in zip(
            in_hw, kernel_size, stride, padding, output_padding, dilation, strict=True
        )
    )


def pool2d_output_shape(in_hw: Pair, kernel_size: Pair, stride: Pair, padding: Pair) -> Pair:
    """``(H_out, W_out)`` of max-pooling (floor mode, as PyTorch's default)."""
    return conv2d_output_shape(
        in_hw, kernel_size, stride, ((padding[0],) * 2, (padding[1],) * 2), (1, 1)
    )


# --- U-Net tile arithmetic -------------------------------------------------------------------
# A valid-padding U-Net level applies ``convs_per_level`` 3x3 convolutions (each removes 2
# pixels); the contracting path halves the size with a 2x2 max-pool (which needs an even size),
# the expanding path doubles it with a 2x2 up-convolution.


def unet_output_size(
    size: int, depth: int, *, convs_per_level: int = 2, kernel: int = 3, padding: str = "valid"
) -> int | None:
    """Output edge of a U-Net with ``depth`` resolution levels for an input edge ``size``.

    Returns ``None`` if ``size`` is not valid (a max-pool would see an odd size, or a size
    would drop below 1). With ``padding="same"`` the output equals the input, which must be
    divisible by ``2**(depth-1)``.
    """
    if padding == "same":
        return size if size >= 1 and size % 2 ** (depth - 1) == 0 else None
    shrink = convs_per_level * (kernel - 1)
    for _ in range(depth - 1):  # contracting path
        size -= shrink
        if size < 2 or size % 2:
            return None
        size //= 2
    size -= shrink  # bottom of the U
    if size < 1:
        return None
    for _ in range(depth - 1):  # expanding path
        size = 2 * size - shrink
        if size < 1:
            return None
    return size


def unet_valid_input_size(
    n: int, depth: int, *, convs_per_level: int = 2, kernel: int = 3, padding: str = "valid"
) -> int:
    """The smallest input edge ``>= n`` that a U-Net of this shape accepts."""
    size = max(int(n), 1)
    while unet_output_size(size, depth, convs_per_level=convs_per_level, kernel=kernel,
                           padding=padding) is None:
        size += 1
    return size


def unet_input_size_for_output(
    out: int, depth: int, *, convs_per_level: int = 2, kernel: int = 3, padding: str = "valid"
) -> int:
    """The smallest valid input edge whose output edge is at least ``out``."""
    if padding == "same":
        return unet_valid_input_size(out, depth, padding="same")
    shrink = convs_per_level * (kernel - 1)
    size = max(int(out), 1)
    for _ in range(depth - 1):  # undo the expanding path: size = 2*s - shrink  =>  s
        size = -(-(size + shrink) // 2)
    size += shrink
    for _ in range(depth - 1):
        size = 2 * size + shrink
    return unet_valid_input_size(size, depth, convs_per_level=convs_per_level, kernel=kernel)


# --- Kernel helpers ----------------------------------------------------------------------------


def symmetric_padding(padding: Pair) -> Padding2d:
    """``(ph, pw)`` -> ``((ph, ph), (pw, pw))``, the form in which every kernel takes padding."""
    return ((padding[0], padding[0]), (padding[1], padding[1]))


def padded_shape(in_hw: Pair, padding: Padding2d) -> Pair:
    """``(H + top + bottom, W + left + right)``."""
    return (in_hw[0] + sum(padding[0]), in_hw[1] + sum(padding[1]))


def signal2d_mode_window(
    image_shape: Pair, kernel_shape: Pair, mode: str, *, convolve: bool
) -> tuple[slice, slice]:
    """The part of the "full" 2-D convolution/correlation that a SciPy ``mode`` keeps.

    The full result of an ``(H, W)`` image with a ``(kH, kW)`` kernel is
    ``(H + kH - 1, W + kW - 1)``; along each axis:

    * ``"full"``:  all of it.
    * ``"same"``:  ``H`` entries starting at ``(kH - 1) // 2`` for a convolution and at
      ``kH // 2`` for a correlation (SciPy's centring; the two differ for even kernels).
    * ``"valid"``: the ``|H - kH| + 1`` positions where one array covers the other entirely,
      starting at ``min(H, kH) - 1``. One array must be at least as large as the other in
      *every* dimension, as in SciPy.
    """
    if mode not in ("full", "same", "valid"):
        raise ValueError(f"mode must be 'full', 'same' or 'valid', got {mode!r}")
    if mode == "valid":
        image_covers = all(n >= k for n, k in zip(image_shape, kernel_shape, strict=True))
        kernel_covers = all(k >= n for n, k in zip(image_shape, kernel_shape, strict=True))
        if not (image_covers or kernel_covers):
            raise ValueError(
                "mode='valid' needs the image to be at least as large as the kernel in every "
                f"dimension (or the other way round); got image {tuple(image_shape)} and "
                f"kernel {tuple(kernel_shape)}"
            )
    windows = []
    for n, k in zip(image_shape, kernel_shape, strict=True):
        if mode == "full":
            start, length = 0, n + k - 1
        elif mode == "same":
            start, length = ((k - 1) // 2 if convolve else k // 2), n
        else:
            start, length = min(n, k) - 1, abs(n - k) + 1
        windows.append(slice(start, start + length))
    return windows[0], windows[1]


def unet_receptive_field(depth: int, *, convs_per_level: int = 2, kernel: int = 3) -> int:
    """Edge length of the input region that one output pixel of a U-Net depends on.

    Computed exactly by following, for every pixel of every feature map along one axis, the
    first and last input index it depends on: a valid ``k``-tap convolution joins the
    intervals of ``k`` neighbours, a 2x2 max-pool those of 2 neighbours, a 2x2/stride-2
    up-convolution copies the interval of the pixel it comes from, and a crop-and-concat
    takes the union of the skip's and the up-sampled map's intervals. Pooling makes the
    region depend on an output pixel's position modulo ``2**(depth-1)``; the largest region
    is returned. It is the same for ``padding="same"`` away from the image border.
    """
    size = unet_input_size_for_output(2 ** depth, depth, convs_per_level=convs_per_level,
                                      kernel=kernel)
    first, last = list(range(size)), list(range(size))

    def convolve(first, last):
        count = len(first) - kernel + 1
        return first[:count], last[kernel - 1:]

    skips = []
    for _ in range(depth - 1):
        for _ in range(convs_per_level):
            first, last = convolve(first, last)
        skips.append((first, last))
        first, last = first[0::2], last[1::2]
    for _ in range(convs_per_level):
        first, last = convolve(first, last)
    for skip_first, skip_last in reversed(skips):
        first = [first[i // 2] for i in range(2 * len(first))]
        last = [last[i // 2] for i in range(2 * len(last))]
        start = (len(skip_first) - len(first)) // 2
        window = slice(start, start + len(first))
        first = [min(a, b) for a, b in zip(skip_first[window], first, strict=True)]
        last = [max(a, b) for a, b in zip(skip_last[window], last, strict=True)]
        for _ in range(convs_per_level):
            first, last = convolve(first, last)
    return max(b - a + 1 for a, b in zip(first, last, strict=True))
