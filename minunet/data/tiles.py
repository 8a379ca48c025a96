"""Tiles for training a U-Net, mirror-padded as in the paper's overlap-tile strategy.

A valid-padding U-Net maps an input tile of edge ``n_in`` to a smaller output tile of edge
``n_out`` that sits in its centre, ``margin = (n_in - n_out) / 2`` pixels from each side. To
predict (and so to train on) the pixels at an image border, the input is extended beyond the
border by mirroring the image (the paper's Fig. 2).

Mirror convention: ``numpy.pad(mode="reflect")``, which mirrors *about* the border pixel
(``a b c | b a``) so the border pixel is not duplicated. Duplicating it
(``mode="symmetric"``, ``a b c | c b a``) would create a flat two-pixel strip along every
border, a structure that never occurs inside a real image.
"""

from __future__ import annotations

import numpy as np

from minunet.data.augment import augment
from minunet.shapes import unet_input_size_for_output, unet_output_size

MIRROR_MODE = "reflect"


def mirror_pad(array, pad) -> np.ndarray:
    """Mirror-pad the last two axes of ``array``.

    ``pad`` is an int (all sides) or ``((top, bottom), (left, right))``. Pads larger than the
    image are allowed (NumPy reflects repeatedly).
    """
    array = np.asarray(array)
    if isinstance(pad, (int, np.integer)):
        pad = ((pad, pad), (pad, pad))
    widths = [(0, 0)] * (array.ndim - 2) + [tuple(int(p) for p in pad[0]),
                                           tuple(int(p) for p in pad[1])]
    if min(min(w) for w in widths) < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
    if array.shape[-2] == 1 or array.shape[-1] == 1:  # reflect needs two pixels to mirror
        return np.pad(array, widths, mode="edge")
    return np.pad(array, widths, mode=MIRROR_MODE)


def crop_margin(input_size: int, output_size: int) -> int:
    """Pixels between the border of an input tile and its output tile (``(in - out) / 2``)."""
    if input_size < output_size or (input_size - output_size) % 2:
        raise ValueError(
            f"the output tile ({output_size}) must be centred in the input tile ({input_size}): "
            "their difference must be even and non-negative"
        )
    return (input_size - output_size) // 2


def extract_tile(array, top: int, left: int, size: int, margin: int) -> np.ndarray:
    """The ``(size + 2 margin)``-square input region around the output square whose top-left
    corner is ``(top, left)`` in ``array``'s coordinates, mirror-padded where it leaves the
    array. Works on (H, W) and (C, H, W).
    """
    array = np.asarray(array)
    height, width = array.shape[-2:]
    r0, c0 = top - margin, left - margin
    r1, c1 = top + size + margin, left + size + margin
    pad = ((max(-r0, 0), max(r1 - height, 0)), (max(-c0, 0), max(c1 - width, 0)))
    window = array[..., max(r0, 0):min(r1, height), max(c0, 0):min(c1, width)]
    return mirror_pad(window, pad) if any(sum(p) for p in pad) else window.copy()


class TileSampler:
    """Random training tiles ``(input, target, weight)`` from labelled images.

    Parameters
    ----------
    images : sequence of float arrays (H_i, W_i) or (C, H_i, W_i)
    targets : sequence of int arrays (H_i, W_i): class index of every pixel
    weights : sequence of float arrays (H_i, W_i), or None for all ones
    input_size, output_size : int
        Tile edges of the network (see ``minunet.shapes.unet_input_size_for_output`` and
        ``unet_output_size``; equal for a 'same'-padding network).
    augment_tiles : bool
        Apply :func:`minunet.data.augment.augment` to each tile. The tile is cut with an extra
        mirror margin of ``3 * elastic_std`` before the deformation and cropped afterwards,
        so the warp pulls in real neighbouring pixels rather than mirrored tile edges.

    ``sample(batch_size, rng)`` returns ``x`` (N, C, input, input) float32, ``target``
    (N, output, output) int64 and ``weight`` (N, output, output) float32. The output square
    is drawn uniformly among positions inside the image (images smaller than the output tile
    are mirror-extended, and their padding is part of the target).
    """

    def __init__(self, images, targets, weights=None, *, input_size: int, output_size: int,
                 augment_tiles: bool = True, elastic_std: float = 10.0):
        if len(images) == 0 or len(images) != len(targets):
            raise ValueError(
                f"images and targets must be non-empty and of equal length, got "
                f"{len(images)} and {len(targets)}"
            )
        if weights is not None and len(weights) != len(images):
            raise ValueError(f"weights must have one map per image, got {len(weights)}")
        self.images = [np.asarray(im, np.float32) for im in images]
        self.images = [im[None] if im.ndim == 2 else im for im in self.images]
        self.targets = [np.asarray(t) for t in targets]
        self.weights = (
            [np.ones(t.shape, np.float32) for t in self.targets]
            if weights is None else [np.asarray(w, np.float32) for w in weights]
        )
        for i, (im, t, w) in enumerate(zip(self.images, self.targets, self.weights, strict=True)):
            if im.ndim != 3 or t.shape != im.shape[1:] or w.shape != t.shape:
                raise ValueError(
                    f"image {i}: expected image (H, W) or (C, H, W) with target and weight "
                    f"(H, W); got {im.shape}, {t.shape}, {w.shape}"
                )
        if len({im.shape[0] for im in self.images}) != 1:
            raise ValueError("all images must have the same number of channels")
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.margin = crop_margin(self.input_size, self.output_size)
        self.augment_tiles = augment_tiles
        self.elastic_std = float(elastic_std)
        # Larger images are drawn more often: every labelled pixel is equally likely.
        areas = np.array([t.size for t in self.targets], dtype=np.float64)
        self.image_probabilities = areas / areas.sum()

    @classmethod
    def for_unet(cls, images, targets, weights=None, *, output_size: int, depth: int,
                 padding: str = "valid", **kwargs) -> TileSampler:
        """A sampler whose tiles fit a U-Net of ``depth`` levels: the input edge is
        ``unet_input_size_for_output(output_size)``, the output edge what the network
        returns for it (``>= output_size``)."""
        input_size = unet_input_size_for_output(output_size, depth, padding=padding)
        actual_output = unet_output_size(input_size, depth, padding=padding)
        return cls(images, targets, weights, input_size=input_size, output_size=actual_output,
                   **kwargs)

    def _one(self, rng: np.random.Generator):
        index = rng.choice(len(self.images), p=self.image_probabilities)
        image, target, weight = self.images[index], self.targets[index], self.weights[index]
        height, width = target.shape
        out = self.output_size
        top = int(rng.integers(0, max(height - out, 0) + 1))
        left = int(rng.integers(0, max(width - out, 0) + 1))
        extra = int(np.ceil(3 * self.elastic_std)) if self.augment_tiles else 0
        margin = self.margin + extra
        x = extract_tile(image, top, left, out, margin)
        t = extract_tile(target, top - self.margin, left - self.margin, self.input_size, extra)
        w = extract_tile(weight, top - self.margin, left - self.margin, self.input_size, extra)
        if self.augment_tiles:
            x, t, w = augment(x, t, w, rng=rng, elastic_std=self.elastic_std)
        inner = slice(extra, extra + self.input_size)
        crop = slice(extra + self.margin, extra + self.margin + out)
        return x[:, inner, inner], t[crop, crop], w[crop, crop]

    def sample(self, batch_size: int, rng: np.random.Generator):
        """A batch ``(x, target, weight)``; see the class docstring for shapes."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        tiles = [self._one(rng) for _ in range(batch_size)]
        x, t, w = (np.stack(parts) for parts in zip(*tiles, strict=True))
        return x.astype(np.float32), t.astype(np.int64), w.astype(np.float32)
