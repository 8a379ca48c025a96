"""From class probabilities to labelled, counted cells.

1. Threshold the foreground probability into a mask; drop specks and fill holes below
   ``min_size`` pixels.
2. Cells that touch form one connected region of the mask. Inside a region, the Euclidean
   distance to the background has one hill per roughly convex cell; two cells meet at a
   saddle ("neck") of the distance map. Multiplying the distance by the foreground
   probability deepens the necks where the network saw a faint boundary.
3. One marker per hill: the *h-maxima* of the (lightly smoothed) distance map, i.e. the tops
   of the hills that rise at least ``h`` pixels above the saddle to any higher hill. (Plain
   local maxima would over-split elongated or noisy cells; ``h`` is a contrast, not a size.)
4. A marker-based watershed floods the distance map from the markers, highest ground first;
   each flooded region becomes one cell, and the floods meet at the necks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed


def foreground_probability(prob) -> np.ndarray:
    """The per-pixel probability of "any cell": ``prob`` itself if (H, W); for class
    probabilities (C, H, W), ``1 - prob[0]`` (class 0 = background)."""
    prob = np.asarray(prob)
    if prob.ndim == 2:
        return prob.astype(np.float32, copy=False)
    if prob.ndim == 3 and prob.shape[0] >= 2:
        return (1 - prob[0]).astype(np.float32)
    raise ValueError(
        f"prob must be a foreground probability (H, W) or class probabilities (C >= 2, H, W), "
        f"got shape {prob.shape}"
    )


def reconstruct_by_dilation(marker, mask) -> np.ndarray:
    """Grey-level morphological reconstruction of ``marker`` (<= ``mask``) under ``mask``:
    repeated 3x3 dilation of ``marker``, clipped by ``mask``, until nothing changes.

    Every round only raises values, each to one of finitely many (those of ``marker`` and
    ``mask``), so the loop ends. NaN would break that argument (it never compares equal, so
    "nothing changes" never comes): NaN inputs are refused.
    """
    if np.isnan(marker).any() or np.isnan(mask).any():
        raise ValueError("marker and mask must not contain NaN")
    reconstruction = np.minimum(marker, mask)
    while True:
        grown = np.minimum(ndimage.grey_dilation(reconstruction, size=(3, 3)), mask)
        if np.array_equal(grown, reconstruction):
            return reconstruction
        reconstruction = grown


def h_maxima(image, h: float) -> np.ndarray:
    """Boolean mask of the tops of the hills of ``image`` that rise at least ``h`` above
    the saddle that joins them to any higher hill (the "extended maxima").

    Reconstructing ``image - h`` under ``image`` cuts every hill ``h`` below its top (the
    h-maxima transform): hills lower than ``h`` above their saddle merge into the plateau of
    their higher neighbour. The regional maxima of that result, found with a second
    reconstruction shifted by a tiny amount, are the markers.
    """
    image = np.asarray(image, dtype=np.float64)
    if h <= 0:
        raise ValueError(f"h must be positive, got {h}")
    flattened = reconstruct_by_dilation(image - h, image)
    tiny = 1e-6 * max(h, 1.0)
    return flattened - reconstruct_by_dilation(flattened - tiny, flattened) > tiny / 2


def flood_from_markers(height, markers, mask, *, step: float = 0.5) -> np.ndarray:
    """Marker-based watershed: grow ``markers`` (int (H, W), 0 = unlabelled) over ``mask``,
    visiting pixels from the highest ``height`` down, in levels ``step`` apart.

    At each level every labelled region repeatedly claims its unlabelled 4-neighbours whose
    height is at or above the level, until nothing changes; two floods that meet stop at
    each other, so their border follows the valleys ("necks") of ``height``. Returns int32
    labels, 0 outside ``mask``. (``scipy.ndimage.watershed_ift`` was tried first: it let
    floods leak across high-cost background and wrap around the image's left/right edges.)
    """
    labels = np.where(mask, markers, 0).astype(np.int32)
    cross = ndimage.generate_binary_structure(2, 1)
    top = float(height[mask].max(initial=0.0)) if mask.any() else 0.0
    for level in np.arange(top, -step, -step):
        allowed = mask & (height >= level)
        while True:
            grown = ndimage.grey_dilation(labels, footprint=cross)
            claim = allowed & (labels == 0) & (grown > 0)
            if not claim.any():
                break
            labels[claim] = grown[claim]
    return labels


def split_touching(mask, *, h: float = 0.5, smoothing: float = 1.0,
                   confidence=None) -> np.ndarray:
    """Instance labels (int32 (H, W)) of a binary mask, touching cells split by a watershed
    on the distance transform (see the module docstring). Every connected component of the
    mask gets at least one label; pixels outside the mask are 0.

    ``confidence`` (float (H, W), optional): the foreground probability. The distance map is
    multiplied by it, so a neck where the network hesitated (a faint separation line it did
    not quite draw) becomes a deeper valley between two hills.
    """
    mask = np.asarray(mask) > 0
    distance = ndimage.distance_transform_edt(mask)
    if confidence is not None:
        distance = distance * np.clip(confidence, 0, 1)
    if smoothing > 0:  # the discrete distance map has ridges that are not real necks
        distance = ndimage.gaussian_filter(distance, smoothing) * mask
    markers, num_markers = ndimage.label(h_maxima(distance, h) & mask,
                                         structure=np.ones((3, 3)))
    # A component too flat to hold an h-maximum still is a cell: it becomes its own marker.
    components, _ = ndimage.label(mask)
    unmarked = np.setdiff1d(np.unique(components[mask]), np.unique(components[markers > 0]))
    extra = np.isin(components, unmarked)
    lookup = np.zeros(components.max() + 1, np.int64)
    lookup[unmarked] = num_markers + 1 + np.arange(len(unmarked))
    markers = np.where(extra, lookup[components], markers).astype(np.int32)
    labels = flood_from_markers(distance, markers, mask)
    return np.where(mask, labels, 0).astype(np.int32)


def fill_separation_gaps(labels, width: int = 1) -> np.ndarray:
    """Give back to the cells the thin gaps that separate touching cells.

    A network trained on targets with carved separation borders
    (:func:`minunet.data.carve_separation_borders`) predicts touching cells with a gap of
    about ``width`` px between them. Here every background pixel within ``width`` px
    (chessboard) of two different cells takes the label of the nearest cell, so that the
    areas of touching cells are not underestimated. Other background pixels are untouched.
    """
    labels = np.asarray(labels)
    reach = 2 * width + 1
    highest = ndimage.maximum_filter(labels, size=reach, mode="constant")
    lowest = ndimage.minimum_filter(np.where(labels > 0, labels, labels.max(initial=0) + 1),
                                    size=reach, mode="constant", cval=labels.max(initial=0) + 1)
    gap = (labels == 0) & (highest > 0) & (lowest < highest)
    if not gap.any():
        return labels.copy()
    _, (rows, cols) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    return np.where(gap, labels[rows, cols], labels)


def relabel_sequential(labels) -> np.ndarray:
    """Labels renumbered 1..K in order of first label id (0 stays 0), int32."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lookup = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lookup[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lookup[labels]


def _drop_small(mask, min_size: int, structure=None) -> np.ndarray:
    """``mask`` without its connected regions (default: 4-connected) of fewer than
    ``min_size`` pixels."""
    components, _ = ndimage.label(mask, structure=structure)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return sizes[components] >= min_size


def label_instances(prob, *, threshold: float = 0.5, min_size: int = 10, h: float = 0.5,
                    smoothing: float = 1.0, separate: bool = True,
                    gap_width: int = 1) -> np.ndarray:
    """Instance labels (int32 (H, W), 0 = background, cells 1..K) from probabilities.

    ``prob``: foreground probability (H, W) or class probabilities (C, H, W). Pixels with
    foreground probability ``> threshold`` are cells; connected regions smaller than
    ``min_size`` pixels are dropped and holes smaller than ``min_size`` pixels filled; with
    ``separate`` touching cells are split with :func:`split_touching` (``h``, ``smoothing``
    in pixels), otherwise every connected region is one cell; finally the gaps between
    touching cells are filled (:func:`fill_separation_gaps` with ``gap_width``; 0 = keep
    the gaps).
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    foreground = foreground_probability(prob)
    if np.isnan(foreground).any():
        raise ValueError(f"prob holds {int(np.isnan(foreground).sum())} NaN value(s); "
                         f"probabilities must be numbers in [0, 1]")
    mask = foreground > threshold
    mask = _drop_small(mask, min_size)
    # Holes are background regions that no 8-connected path links to the outside: a gap
    # line between two cells that runs diagonally is 8-connected, and must not be filled.
    eight = np.ones((3, 3), bool)
    holes = ndimage.binary_fill_holes(mask, structure=eight) & ~mask
    filled = holes & ~_drop_small(holes, min_size, structure=eight)
    mask |= filled  # small holes are part of their cell...
    foreground = np.where(filled, 1.0, foreground)  # ...and not a valley inside it
    labels = (split_touching(mask, h=h, smoothing=smoothing, confidence=foreground)
              if separate else ndimage.label(mask)[0])
    if gap_width > 0:
        labels = fill_separation_gaps(labels, gap_width)
    return relabel_sequential(labels)


def label_boundary_classes(prob, *, min_size: int = 10) -> np.ndarray:
    """Instance labels (int32 (H, W)) from the probabilities of a three-class network
    (0 background, 1 cell interior, 2 cell boundary; see
    :func:`minunet.data.boundary_classes`).

    Each connected interior region of at least ``min_size`` pixels seeds one cell; the cells
    then grow over the pixels classified as boundary, by a watershed on the interior
    probability (scikit-image's), so that the boundary band between two touching cells is
    shared out between them.
    """
    prob = np.asarray(prob)
    if prob.ndim != 3 or prob.shape[0] != 3:
        raise ValueError(f"prob must be three-class probabilities (3, H, W), got {prob.shape}")
    classes = prob.argmax(axis=0)
    seeds = _drop_small(classes == 1, min_size)
    markers, _ = ndimage.label(seeds)
    labels = watershed(-prob[1], markers, mask=classes > 0)
    return relabel_sequential(labels)
