"""Data augmentation: the paper's elastic deformations, flips and rotations, gray-value jitter.

The U-Net paper trains on very few images and relies on augmentation. Its key ingredient is
a smooth random deformation: random displacement vectors on a coarse 3 x 3 grid, drawn from a
Gaussian with a standard deviation of 10 pixels, interpolated bicubically to a per-pixel
displacement field. The same warp is applied to the image, to its labels (nearest neighbour,
so labels stay labels) and to its weight map.

Every function takes a ``numpy.random.Generator`` and never touches global random state, so
a seeded training run is repeatable. Arrays are ``(H, W)`` or, for images, ``(C, H, W)``;
all arrays passed together share the same ``(H, W)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# The 8 symmetries of the square (the dihedral group D4): k quarter-turns, then an optional
# left-right flip. ``apply_dihedral`` and ``invert_dihedral`` are exact inverses.
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def _spatial_shape(arrays) -> tuple[int, int]:
    shapes = {np.shape(a)[-2:] for a in arrays if a is not None}
    if len(shapes) != 1:
        raise ValueError(f"all arrays must share the same (H, W), got {sorted(shapes)}")
    return shapes.pop()


def apply_dihedral(array, k: int, flip: bool) -> np.ndarray:
    """Rotate the last two axes by ``k`` quarter-turns, then flip left-right if ``flip``."""
    out = np.rot90(np.asarray(array), k, axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if flip else out)


def invert_dihedral(array, k: int, flip: bool) -> np.ndarray:
    """Undo :func:`apply_dihedral` with the same ``(k, flip)``."""
    out = np.asarray(array)
    out = out[..., ::-1] if flip else out
    return np.ascontiguousarray(np.rot90(out, -k, axes=(-2, -1)))


def random_dihedral(rng: np.random.Generator, *arrays):
    """Apply one random element of :data:`DIHEDRAL` to every array (``None`` passes through)."""
    k, flip = DIHEDRAL[rng.integers(len(DIHEDRAL))]
    return tuple(None if a is None else apply_dihedral(a, k, flip) for a in arrays)


def elastic_displacement(shape, rng: np.random.Generator, *, std: float = 10.0, grid: int = 3):
    """A smooth random displacement field, float64 (2, H, W) in pixels (rows, cols).

    Displacements are drawn i.i.d. from ``N(0, std**2)`` at the nodes of a ``grid x grid``
    lattice spanning the image (nodes on the corners), then interpolated to every pixel with a
    cubic spline (``scipy.ndimage.map_coordinates``, order 3): the paper's "bicubic
    interpolation" of coarse displacements.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if grid < 2:
        raise ValueError(f"grid must be >= 2 nodes per side, got {grid}")
    coarse = rng.normal(0.0, std, size=(2, grid, grid))
    node_rows = np.linspace(0, grid - 1, shape[0])
    node_cols = np.linspace(0, grid - 1, shape[1])
    where = np.meshgrid(node_rows, node_cols, indexing="ij")
    return np.stack([ndimage.map_coordinates(c, where, order=3, mode="nearest") for c in coarse])


def warp(array, displacement, *, order: int, mode: str = "reflect") -> np.ndarray:
    """Resample ``array`` ((H, W) or (C, H, W)) at ``identity + displacement``.

    ``out[..., i, j] = array[..., i + dy[i, j], j + dx[i, j]]`` (spline of ``order``: 0 for
    labels, 1 or 3 for images). Outside the image the input is mirrored (``mode``). Keeps the
    dtype; with ``order > 1`` the result is clipped to the input's range, since cubic splines
    overshoot at edges.
    """
    array = np.asarray(array)
    height, width = array.shape[-2:]
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    where = [rows + displacement[0], cols + displacement[1]]
    planes = array.reshape(-1, height, width)
    out = np.stack([
        ndimage.map_coordinates(plane, where, order=order, mode=mode) for plane in planes
    ]).reshape(array.shape)
    if order > 1 and array.size:
        out = np.clip(out, array.min(), array.max())
    return out.astype(array.dtype, copy=False)


def elastic_deform(image, labels=None, weights=None, *, rng: np.random.Generator,
                   std: float = 10.0, grid: int = 3, image_order: int = 3):
    """The paper's elastic deformation, applied identically to image, labels and weights.

    ``image`` (H, W) or (C, H, W) is interpolated with splines of ``image_order``; ``labels``
    with order 0 (nearest: every output value is one of the input labels); ``weights`` with
    order 1. Returns ``(image, labels, weights)`` (``None`` stays ``None``). With ``std = 0``
    the arrays come back unchanged.
    """
    shape = _spatial_shape((image, labels, weights))
    displacement = elastic_displacement(shape, rng, std=std, grid=grid)
    return (
        warp(image, displacement, order=image_order),
        None if labels is None else warp(labels, displacement, order=0),
        None if weights is None else warp(weights, displacement, order=1),
    )


def gray_value_jitter(image, rng: np.random.Generator, *, brightness: float = 0.1,
                      contrast: float = 0.2, gamma: float = 0.2) -> np.ndarray:
    """Random change of gray values, same dtype as ``image`` (expected in [0, 1]).

    ``out = clip(contrast_factor * (image ** g - mean) + mean + shift, 0, 1)`` with
    ``g = exp(U(-gamma, gamma))``, ``contrast_factor = 1 + U(-contrast, contrast)``,
    ``shift = U(-brightness, brightness)``; the mean is taken after the gamma curve.
    """
    image = np.asarray(image)
    curved = np.clip(image, 0, 1) ** np.exp(rng.uniform(-gamma, gamma))
    mean = curved.mean()
    factor = 1 + rng.uniform(-contrast, contrast)
    shift = rng.uniform(-brightness, brightness)
    return np.clip(factor * (curved - mean) + mean + shift, 0, 1).astype(image.dtype, copy=False)


def augment(image, labels=None, weights=None, *, rng: np.random.Generator,
            elastic_std: float = 10.0, grid: int = 3, dihedral: bool = True,
            jitter: bool = True):
    """The training augmentation: random dihedral transform, elastic deformation (skipped
    when ``elastic_std = 0``), gray-value jitter of the image only.

    Returns ``(image, labels, weights)`` with the shapes and dtypes of the inputs.
    """
    if dihedral:
        image, labels, weights = random_dihedral(rng, image, labels, weights)
    if elastic_std > 0:
        image, labels, weights = elastic_deform(image, labels, weights, rng=rng,
                                                std=elastic_std, grid=grid)
    if jitter:
        image = gray_value_jitter(image, rng)
    return image, labels, weights
