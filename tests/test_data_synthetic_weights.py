"""Synthetic cells and the paper's weight map (Eq. 2), against brute-force oracles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from minunet.data import (
    carve_separation_borders,
    class_weight_map,
    separation_borders,
    synthetic_cell_image,
    synthetic_cells,
    two_nearest_cell_distances,
    weight_map,
)


def touching_pairs(labels):
    """Unordered pairs of different cells that share a 4-connected edge."""
    pairs = set()
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
        edge = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[edge].tolist(), b[edge].tolist(), strict=True)}
    return pairs


# --- synthetic cells ------------------------------------------------------------------------


def test_synthetic_is_seeded_and_independent_of_n():
    images, labels = synthetic_cells(3, size=64, seed=7)
    again_images, again_labels = synthetic_cells(2, size=64, seed=7)
    np.testing.assert_array_equal(images[:2], again_images)
    np.testing.assert_array_equal(labels[:2], again_labels)
    other, _ = synthetic_cells(1, size=64, seed=8)
    assert not np.array_equal(other[0], images[0])


def test_synthetic_labels_are_exact_instances():
    image, labels = synthetic_cell_image((96, 128), seed=3)
    assert image.shape == labels.shape == (96, 128)
    assert image.dtype == np.float32 and labels.dtype == np.int32
    assert 0.0 <= image.min() and image.max() <= 1.0
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(ids.max() + 1))  # 0..K, consecutive
    for k in ids[1:]:  # every cell is one 4-connected region
        assert ndimage.label(labels == k)[1] == 1
    # cells are brighter than background on average (the image shows the labels)
    assert image[labels > 0].mean() > image[labels == 0].mean() + 0.2


def test_synthetic_touching_cells_are_common():
    _, labels = synthetic_cells(4, size=128, seed=0)
    touching = [len(touching_pairs(lab)) for lab in labels]
    cells = [lab.max() for lab in labels]
    assert sum(touching) >= 0.3 * sum(cells), (touching, cells)
    _, apart = synthetic_cell_image(128, seed=0, touching_fraction=0.0, num_cells=10,
                                    radius_range=(5, 6))
    assert len(touching_pairs(apart)) <= 2


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="radius_range"):
        synthetic_cell_image(64, radius_range=(5, 2))
    with pytest.raises(ValueError, match="size"):
        synthetic_cell_image(0)
    with pytest.raises(TypeError, match="seed"):
        synthetic_cell_image(64, seed="abc")


# --- weight map -----------------------------------------------------------------------------


def brute_force_weight_map(labels, w0, sigma, class_weights):
    """Eq. 2 pixel by pixel: distances to every pixel of every cell, two smallest per pixel."""
    height, width = labels.shape
    cells = [np.argwhere(labels == k) for k in np.unique(labels) if k > 0]
    out = np.empty(labels.shape)
    for i in range(height):
        for j in range(width):
            if labels[i, j] > 0:
                out[i, j] = class_weights[1]
                continue
            nearest = sorted(np.sqrt(((c - (i, j)) ** 2).sum(axis=1)).min() for c in cells)
            border = 0.0
            if len(nearest) >= 2:
                border = w0 * np.exp(-((nearest[0] + nearest[1]) ** 2) / (2 * sigma**2))
            out[i, j] = class_weights[0] + border
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_map_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = np.zeros((17, 23), np.int32)
    for k in range(1, 5):  # four random rectangles, possibly touching or overlapping
        r, c = rng.integers(0, 14), rng.integers(0, 20)
        labels[r:r + rng.integers(1, 5), c:c + rng.integers(1, 5)] = k
    expected = brute_force_weight_map(labels, 10.0, 3.0, (0.7, 1.3))
    got = weight_map(labels, w0=10.0, sigma=3.0, class_weights=(0.7, 1.3))
    assert got.dtype == np.float32 and got.shape == labels.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6)


def test_two_nearest_distances_match_brute_force_and_truncation():
    labels = np.zeros((12, 30), np.int32)
    labels[2:5, 1:4], labels[7:9, 12:14], labels[3:6, 25:29] = 1, 2, 3
    d1, d2 = two_nearest_cell_distances(labels)
    cells = [np.argwhere(labels == k) for k in (1, 2, 3)]
    for i, j in [(0, 0), (6, 8), (11, 29), (4, 2), (8, 20)]:
        dist = sorted(np.sqrt(((c - (i, j)) ** 2).sum(axis=1)).min() for c in cells)
        assert d1[i, j] == pytest.approx(dist[0]) and d2[i, j] == pytest.approx(dist[1])
    near1, near2 = two_nearest_cell_distances(labels, max_distance=5.0)
    np.testing.assert_array_equal(near1, np.where(d1 <= 5, d1, np.inf))
    np.testing.assert_array_equal(near2, np.where(d2 <= 5, d2, np.inf))


def test_weight_map_fewer_than_two_cells_has_no_border_term():
    labels = np.zeros((10, 10), np.int32)
    np.testing.assert_array_equal(weight_map(labels, class_weights=(1.0, 1.0)), np.ones((10, 10)))
    labels[3:6, 3:6] = 4
    np.testing.assert_array_equal(weight_map(labels, class_weights=(2.0, 1.0)),
                                  np.where(labels > 0, 1.0, 2.0))


def test_weight_map_peaks_between_close_cells():
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 2:9], labels[5:15, 10:18] = 1, 2  # a one-pixel gap at column 9
    weights = weight_map(labels, w0=10.0, sigma=5.0, class_weights=(1.0, 1.0))
    # in the gap d1 = d2 = 1: 1 + 10 exp(-4 / 50)
    assert weights[10, 9] == pytest.approx(1 + 10 * np.exp(-4 / 50), rel=1e-6)
    assert weights[10, 9] == weights.max()


def test_balanced_class_weights_are_inverse_frequencies_with_mean_one():
    labels = np.zeros((4, 5), np.int32)
    labels[0, :4] = 1  # 4 foreground pixels out of 20
    weights = class_weight_map(labels, "balanced")
    assert weights[0, 0] == pytest.approx(20 / (2 * 4))
    assert weights[3, 3] == pytest.approx(20 / (2 * 16))
    assert weights.mean() == pytest.approx(1.0)
    # one class only: every pixel weighs 1
    np.testing.assert_array_equal(class_weight_map(np.zeros((3, 3), int)), np.ones((3, 3)))


def test_weight_map_bad_input_and_no_mutation():
    labels = np.array([[0, 1], [2, 0]], np.int32)
    before = labels.copy()
    weight_map(labels)
    np.testing.assert_array_equal(labels, before)
    with pytest.raises(TypeError, match="labels"):
        weight_map(labels.astype(float))
    with pytest.raises(ValueError, match="labels"):
        weight_map(labels[None])
    with pytest.raises(ValueError, match="class_weights"):
        weight_map(labels, class_weights="inverse")
    with pytest.raises(ValueError, match="sigma"):
        weight_map(labels, sigma=-1.0)


def test_separation_borders_split_touching_cells():
    labels = np.zeros((6, 8), np.int32)
    labels[1:5, 1:4], labels[1:5, 4:7] = 1, 2  # touching along columns 3|4
    borders = separation_borders(labels, width=1)
    expected = np.zeros_like(borders)
    expected[1:5, 4] = True  # one column, taken from the cell with the larger label
    np.testing.assert_array_equal(borders, expected)
    carved = carve_separation_borders(labels)
    assert ndimage.label(carved > 0)[1] == 2  # the two cells are now apart
    assert carved.dtype == labels.dtype
