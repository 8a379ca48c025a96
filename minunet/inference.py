"""Prediction on images of any size: the paper's overlap-tile strategy (its Fig. 2), and
counting the cells it finds.

A valid-padding U-Net predicts an output tile that is smaller than its input tile; the
missing context around the image is filled by mirroring the image at its borders. Tiles are
laid side by side so that their outputs cover the image exactly once.

Why the result does not depend on the tile size (valid padding): one output pixel depends
only on the input pixels in its receptive field, all of which lie in the (mirror-extended)
image, whatever tile it is computed in. One subtlety: a 2x2 max-pool sees pixel pairs
starting at even positions, so moving a tile by an odd number of pixels changes what the
network computes. Tiles therefore advance by a multiple of ``2**(depth - 1)`` pixels; since
the output edge of a valid U-Net is never such a multiple, consecutive tiles overlap by a
few pixels, and each output pixel is taken from exactly one tile.

A 'same'-padding network pads every convolution with zeros, so pixels near a tile border
see zeros instead of the neighbouring image: its tiles get a ``margin`` of extra context on
every side whose predictions are thrown away. The result then depends only slightly on the
tile size (how slightly depends on the margin: the receptive field of a deep U-Net is larger
than any practical margin).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from minunet.backend import get_array_module, to_device, to_numpy
from minunet.data.augment import DIHEDRAL, apply_dihedral, invert_dihedral
from minunet.data.tiles import mirror_pad
from minunet.losses import softmax
from minunet.postprocess import foreground_probability, label_instances

# Extra context (px, each side) given to every tile of a 'same'-padding network by default.
SAME_PADDING_MARGIN = 32
# Tiles per forward pass on the GPU (one on the CPU, where memory is the limit).
GPU_TILE_BATCH = 4
# Output tile edge of predict by default: memory stays that of a 512 x 512 image (plus
# context) however large the image is. (A 4000 x 4000 image in one pass needed 11 GB.)
DEFAULT_TILE_SIZE = 512


def tiling_plan(net, length: int, tile_size: int | None, extra: int):
    """Tiling of one axis: ``(input_edge, offset, stride, count, pad_before, pad_after)``.

    ``offset`` is where the network's output starts inside its input tile ((in - out) / 2,
    0 for 'same'); every tile keeps the output pixels from ``offset + extra`` on, ``stride``
    of them (the last tile fewer). The image is mirror-padded by ``pad_before`` and
    ``pad_after`` pixels so that every tile lies inside the padded image.
    """
    quantum = 2 ** (net.config["depth"] - 1)
    target = length if tile_size is None else tile_size
    input_edge = net.input_size_for_output(target + 2 * extra)
    offset = (input_edge - net.output_size(input_edge)) // 2
    margin = offset + extra
    usable = input_edge - 2 * margin
    if tile_size is None:
        stride, count = usable, 1
    else:
        stride = usable // quantum * quantum
        if stride < 1:
            raise ValueError(f"tile_size {tile_size} is too small for this network: tiles must "
                             f"keep at least {quantum} output pixels")
        count = -(-length // stride)
    pad_after = (count - 1) * stride + input_edge - margin - length
    return input_edge, offset, stride, count, margin, pad_after


def _axis_tile(tile_size: int | None, length: int) -> int | None:
    """The tile size along an axis of ``length`` pixels: ``None`` (the whole axis in one
    piece) when the axis is no longer than one tile."""
    return None if tile_size is None or tile_size >= length else tile_size


def _predict_once(net, image: np.ndarray, tile_size, margin: int, progress: bool):
    """Class probabilities (num_classes, H, W) of one (C, H, W) image, tile by tile; on the
    GPU the image goes there once and GPU_TILE_BATCH tiles share each forward pass."""
    height, width = image.shape[-2:]
    rows = tiling_plan(net, height, _axis_tile(tile_size, height), margin)
    cols = tiling_plan(net, width, _axis_tile(tile_size, width), margin)
    padded = to_device(mirror_pad(image, ((rows[4], rows[5]), (cols[4], cols[5]))), net.device)
    xp = get_array_module(padded)
    result = xp.empty((net.config["num_classes"], height, width), np.float32)
    corners = [(i * rows[2], j * cols[2])  # tile corners in padded coordinates
               for i in range(rows[3]) for j in range(cols[3])]
    batch = GPU_TILE_BATCH if net.device == "cupy" else 1
    with tqdm(total=len(corners), desc="tiles", disable=not progress or len(corners) < 2,
              leave=False) as bar:
        for start in range(0, len(corners), batch):
            group = corners[start:start + batch]
            tiles = xp.stack([padded[:, r0:r0 + rows[0], c0:c0 + cols[0]] for r0, c0 in group])
            probabilities = softmax(net.forward(tiles), axis=1)
            for (r0, c0), tile in zip(group, probabilities, strict=True):
                keep_h, keep_w = min(rows[2], height - r0), min(cols[2], width - c0)
                # the first kept output pixel sits `margin` pixels into the network's output
                result[:, r0:r0 + keep_h, c0:c0 + keep_w] = tile[
                    :, margin:margin + keep_h, margin:margin + keep_w]
            bar.update(len(group))
    result = to_numpy(result)
    if not np.isfinite(result).all():
        raise FloatingPointError(
            "the network's output holds NaN or infinite values although the image is finite: "
            "its weights are not finite (a diverged training run?)")
    return result


def context_margin(net, margin: int | None) -> int:
    """The extra context of every tile: ``margin`` checked for ``net`` (0 for a valid
    network, which needs none; ``SAME_PADDING_MARGIN`` by default for a 'same' one)."""
    if net.config["padding"] == "valid":
        if margin:
            raise ValueError("margin is only used by 'same'-padding networks")
        return 0
    if margin is None:
        return SAME_PADDING_MARGIN
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return margin


def predict(net, image, tile_size: int | None = DEFAULT_TILE_SIZE, tta: bool = False, *,
            margin: int | None = None, progress: bool = False) -> np.ndarray:
    """Class probabilities of ``image`` under ``net``, float32 (num_classes, H, W).

    Parameters
    ----------
    net : minunet.UNet
        Evaluated in eval mode (BatchNorm running statistics, no dropout); its previous
        mode is restored afterwards. Works on NumPy or CuPy networks (the image is moved).
    image : (H, W) or (C, H, W) float array in [0, 1], any size, without NaN or infinity
        Converted to the network's dtype; ``C`` must equal the network's ``in_channels``.
    tile_size : int or None
        Edge of the output tile each forward pass produces (rounded to what the network
        allows); an axis no longer than this is predicted in one piece. The default
        (``DEFAULT_TILE_SIZE``) bounds the memory whatever the image's size. ``None``: the
        whole image in one pass (memory grows with the image). For a valid-padding network
        the result does not depend on the tile size (see the module docstring).
    tta : bool
        Test-time augmentation: average the probabilities over the 8 rotations/flips of the
        image (each prediction transformed back), as the paper did with rotations for ISBI.
    margin : int or None
        Extra context around each tile for a 'same'-padding network (default
        ``SAME_PADDING_MARGIN``); must be 0/None for a valid-padding network, which needs none.
    progress : bool
        Show a tqdm bar over the tiles.
    """
    image = np.asarray(to_numpy(image))
    if image.ndim == 2:
        image = image[None]
    channels = net.config["in_channels"]
    if image.ndim != 3 or image.shape[0] != channels or min(image.shape[1:]) < 1:
        raise ValueError(f"image must be (H, W) or ({channels}, H, W) for this network, got "
                         f"shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"image must be floating point with values in [0, 1] (as in training), "
                        f"got {image.dtype}; convert it with minunet.data.as_image")
    not_finite = int(np.count_nonzero(~np.isfinite(image)))
    if not_finite:
        raise ValueError(f"image has {not_finite} NaN or infinite pixel value(s); replace them "
                         f"(e.g. np.nan_to_num) before predicting")
    if tile_size is not None and (not isinstance(tile_size, numbers.Integral) or tile_size < 1):
        raise ValueError(f"tile_size must be a positive int or None, got {tile_size!r}")
    margin = context_margin(net, margin)
    image = image.astype(net.dtype, copy=False)
    was_training = net.training
    net.eval()
    try:
        if not tta:
            return _predict_once(net, image, tile_size, margin, progress)
        total = np.zeros((net.config["num_classes"], *image.shape[1:]), np.float64)
        for k, flip in tqdm(DIHEDRAL, desc="tta", disable=not progress, leave=False):
            turned = apply_dihedral(image, k, flip)
            total += invert_dihedral(_predict_once(net, turned, tile_size, margin, False), k, flip)
        return (total / len(DIHEDRAL)).astype(np.float32)
    finally:
        net.train(was_training)


class CellCount(NamedTuple):
    """Result of :func:`count_cells`: the number of cells, their labels (int32 (H, W)) and
    the foreground probability (float32 (H, W)) they were found in."""

    count: int
    labels: np.ndarray
    probability: np.ndarray


def count_cells(prob_or_image, net=None, *, threshold: float = 0.5, min_size: int = 10,
                h: float = 0.5, smoothing: float = 1.0,
                tile_size: int | None = DEFAULT_TILE_SIZE, tta: bool = False) -> CellCount:
    """Count the cells in an image.

    Without ``net``, ``prob_or_image`` is a probability map (see :func:`label_instances`).
    With ``net``, it is an image (H, W) or (C, H, W) that is first segmented with
    :func:`predict` (``tile_size``, ``tta``). Cells are found by
    :func:`minunet.postprocess.label_instances` (``threshold``, ``min_size``, ``h``,
    ``smoothing``).
    """
    prob = prob_or_image
    if net is not None:
        prob = predict(net, prob_or_image, tile_size=tile_size, tta=tta)
    labels = label_instances(prob, threshold=threshold, min_size=min_size, h=h,
                             smoothing=smoothing)
    return CellCount(int(labels.max(initial=0)), labels, foreground_probability(prob))
