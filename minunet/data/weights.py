"""The U-Net paper's pixel-wise loss weights (Ronneberger et al. 2015, Eq. 2), and the
separation borders between touching cells that those weights emphasise.

Eq. 2 of the paper::

    w(x) = w_c(x) + w0 * exp( -(d1(x) + d2(x))**2 / (2 * sigma**2) )

``w_c`` balances the class frequencies; ``d1`` and ``d2`` are the distances from pixel ``x``
to the nearest and to the second-nearest cell. The second term is large only in the thin
background gaps between two close cells, which is where a segmentation network must learn to
draw a separating line. As in the paper's released implementation, the border term is added to
background pixels only: a foreground pixel lies inside a cell (``d1 = 0``), and its weight is
its class weight.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage

# Distances beyond which the border term ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` is smaller
# than ``_BORDER_TOLERANCE`` are never computed: this keeps every distance transform inside a
# small window around its cell, so the cost grows with the cells' area, not with
# (number of cells) x (image area).
_BORDER_TOLERANCE = 1e-6


def _check_labels(labels, name="labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) label image, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"{name} must hold integer labels (0 = background), got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must be >= 0 (0 = background), got a minimum of {labels.min()}")
    return labels


def class_weight_map(labels, class_weights="balanced", num_classes: int = 2) -> np.ndarray:
    """Per-pixel class weights ``w_c(x)``, float32 (H, W).

    With ``num_classes=2``, ``labels`` are instance labels and the classes are background
    (``labels == 0``) and cell (``labels > 0``); with more classes, ``labels`` are class
    indices ``0 .. num_classes - 1``. ``class_weights`` is one non-negative number per class
    or ``"balanced"``: inversely proportional to the class frequencies,
    ``w_c = N / (K * N_c)`` with ``N`` pixels, ``N_c`` of them in class ``c`` and ``K``
    classes present, so that every class carries the same total weight and the weights
    average to exactly 1 over the image. A class absent from the image gets weight 1 (it has
    no pixels to weigh).
    """
    labels = _check_labels(labels)
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    classes = (labels > 0).astype(np.intp) if num_classes == 2 else labels.astype(np.intp)
    if classes.size and classes.max() >= num_classes:
        raise ValueError(f"labels hold class {classes.max()}, but num_classes is {num_classes}")
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced' or {num_classes} numbers, got "
                             f"{class_weights!r}")
        counts = np.bincount(classes.ravel(), minlength=num_classes).astype(np.float64)
        present = counts > 0
        weights = np.ones(num_classes)
        weights[present] = classes.size / (present.sum() * counts[present])
    else:
        weights = np.asarray(class_weights, dtype=np.float64)
        if (weights.shape != (num_classes,) or not np.all(np.isfinite(weights))
                or np.any(weights < 0)):
            raise ValueError(
                f"class_weights must be 'balanced' or {num_classes} non-negative numbers "
                f"(one per class, background first), got {class_weights!r}"
            )
    return weights[classes].astype(np.float32)


def boundary_classes(labels, width: int = 2) -> np.ndarray:
    """The three-class target of nucleus segmentation (int64 (H, W)): 0 background,
    1 cell interior, 2 cell boundary, the pixels of a cell within ``width`` px (chessboard
    distance) of a pixel that is not that cell.

    Two touching cells are then separated by a band of boundary class that the network can
    learn like any other class, with no weight map; the interiors, grown back over their
    boundary band, are the instances.
    """
    labels = _check_labels(labels)
    if not isinstance(width, numbers.Integral) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    size = 2 * width + 1
    same_around = ((ndimage.maximum_filter(labels, size=size, mode="nearest") == labels)
                   & (ndimage.minimum_filter(labels, size=size, mode="nearest") == labels))
    classes = np.where(labels > 0, 2, 0)
    classes[(labels > 0) & same_around] = 1
    return classes.astype(np.int64)


def two_nearest_cell_distances(labels, max_distance=np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Distances ``d1 <= d2`` (float64 (H, W)) from every pixel to its nearest and its
    second-nearest cell (instance label > 0); ``inf`` where fewer cells are within reach.

    The distance from pixel ``x`` to cell ``k`` is the Euclidean distance from ``x`` to the
    nearest pixel of ``k`` (0 inside ``k``), from one Euclidean distance transform per cell.
    Each transform is computed only in a window of the cell's bounding box grown by
    ``max_distance``: a pixel outside that window is farther than ``max_distance`` from the
    cell, and distances larger than ``max_distance`` are reported as ``inf``. Inside the
    window the transform is exact, because every pixel of the cell lies in it.

    The two smallest distances are kept with a running update per cell,
    ``d2 = min(d2, max(d1, d)); d1 = min(d1, d)``, which needs no (K, H, W) array.
    """
    labels = _check_labels(labels)
    if not (max_distance > 0):
        raise ValueError(f"max_distance must be positive, got {max_distance}")
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    reach = int(np.ceil(min(max_distance, sum(labels.shape))))
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:  # label k is not used
            continue
        window = tuple(
            slice(max(s.start - reach, 0), min(s.stop + reach, n))
            for s, n in zip(box, labels.shape, strict=True)
        )
        distance = ndimage.distance_transform_edt(labels[window] != k)
        distance[distance > max_distance] = np.inf
        near, second = d1[window], d2[window]
        second[...] = np.minimum(second, np.maximum(near, distance))
        near[...] = np.minimum(near, distance)
    return d1, d2


def weight_map(labels, w0: float = 10.0, sigma: float = 5.0,
               class_weights="balanced") -> np.ndarray:
    """The paper's loss weights (Eq. 2) for an instance label image.

    Parameters
    ----------
    labels : int (H, W)
        Instance labels, 0 = background, each cell its own positive label. (A binary mask
        counts as one single cell; split it with ``scipy.ndimage.label`` first.)
    w0, sigma : float
        Height and width (px) of the border term; the paper used ``w0 = 10``, ``sigma ~ 5``.
    class_weights : "balanced" or (background, foreground)
        See :func:`class_weight_map`.

    Returns
    -------
    float32 (H, W):
    ``w(x) = w_c(x) + [x is background] * w0 * exp(-(d1(x) + d2(x))**2 / (2 sigma**2))``,
    with ``d1, d2`` from :func:`two_nearest_cell_distances`. With fewer than two cells the
    border term is 0.
    """
    labels = _check_labels(labels)
    for value, name in ((w0, "w0"), (sigma, "sigma")):
        if not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    weights = class_weight_map(labels, class_weights)
    if w0 == 0 or sigma == 0:
        return weights
    # Beyond d1 + d2 = reach the border term is below the tolerance; since d2 >= d1, pixels
    # with d2 > reach can be skipped.
    reach = sigma * np.sqrt(2 * np.log(max(w0 / _BORDER_TOLERANCE, 1.0)))
    d1, d2 = two_nearest_cell_distances(labels, max_distance=reach)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))  # exp(-inf) = 0 where unreachable
    return (weights + np.where(labels == 0, border, 0.0)).astype(np.float32)


def separation_borders(labels, width: int = 1) -> np.ndarray:
    """Boolean (H, W): pixels of a cell that lie within ``width`` px (chessboard distance)
    of a pixel of a cell with a *smaller* label.

    Touching cells in an instance label image have no background between them; a network
    that predicts only "cell" / "background" can then not separate them. Setting these
    pixels to background (see :func:`carve_separation_borders`) opens a gap of ``width`` px
    between every two touching cells, taken from one side only (the cell with the larger
    label), so the cells lose as little area as possible. Those gaps are what the paper's
    ground truth has, and what its weight map emphasises.
    """
    labels = _check_labels(labels)
    if not isinstance(width, numbers.Integral) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    # Background is pushed out of the minimum with a label larger than any cell's.
    as_int = labels.astype(np.int64)
    cells_only = np.where(as_int > 0, as_int, int(as_int.max(initial=0)) + 1)
    lowest = ndimage.minimum_filter(cells_only, size=2 * width + 1, mode="nearest")
    return (as_int > 0) & (lowest < as_int)


def carve_separation_borders(labels, width: int = 1) -> np.ndarray:
    """A copy of ``labels`` with :func:`separation_borders` set to background (0)."""
    labels = _check_labels(labels)
    return np.where(separation_borders(labels, width), 0, labels).astype(labels.dtype)


def instances_from_mask(mask) -> np.ndarray:
    """Instance labels (int32 (H, W)) from a binary mask: its 4-connected components."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (H, W) array, got shape {mask.shape}")
    labels, _ = ndimage.label(mask > 0)
    return labels.astype(np.int32)
