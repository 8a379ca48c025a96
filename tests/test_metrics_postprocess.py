"""Metrics on hand-made cases with known answers, and post-processing (labelling, counting)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from minunet.data import carve_separation_borders, synthetic_cells
from minunet.inference import count_cells
from minunet.metrics import (
    best_rand_error,
    contingency,
    count_error,
    count_objects,
    dice,
    iou,
    object_scores,
    pixel_error,
    rand_error,
    rand_scores,
    segmentation_report,
)
from minunet.postprocess import (
    fill_separation_gaps,
    flood_from_markers,
    foreground_probability,
    h_maxima,
    label_instances,
    reconstruct_by_dilation,
)


@pytest.fixture
def two_squares():
    """True: 2x2 squares at the top-left and bottom-right of a 4x6 image; predicted: the
    first exact, the second shifted one column to the left."""
    true = np.zeros((4, 6), np.int32)
    true[0:2, 0:2], true[2:4, 4:6] = 1, 2
    pred = np.zeros((4, 6), np.int32)
    pred[0:2, 0:2], pred[2:4, 3:5] = 1, 2
    return pred, true


def test_pixel_scores_by_hand(two_squares):
    pred, true = two_squares
    # overlap: 4 + 2 pixels; union: 4 + (4 + 4 - 2)
    assert iou(pred, true) == pytest.approx(6 / 10)
    assert dice(pred, true) == pytest.approx(2 * 6 / (8 + 8))
    assert pixel_error(pred, true) == pytest.approx(4 / 24)  # columns 3 and 5 of rows 2-3
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        iou(pred, true[:3])


def test_object_scores_by_hand(two_squares):
    pred, true = two_squares
    scores = object_scores(pred, true)  # the shifted square has IoU 2/6 < 0.5
    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (1, 1, 1)
    assert scores.precision == scores.recall == scores.f1 == pytest.approx(0.5)
    assert object_scores(pred, true, iou_threshold=0.3).f1 == 1.0
    assert object_scores(pred, true, iou_threshold=0.3).mean_matched_iou == pytest.approx(
        (1 + 2 / 6) / 2)
    # ids need not agree, nor be consecutive
    relabelled = np.choose(true, [0, 17, 5])
    assert object_scores(relabelled, true).f1 == 1.0
    # nothing predicted: recall 0; nothing at all: perfect
    empty = object_scores(np.zeros_like(true), true)
    assert empty.recall == 0 and empty.false_negatives == 2
    assert object_scores(np.zeros_like(true), np.zeros_like(true)).f1 == 1.0


def test_object_matching_is_one_to_one():
    # one true object split into two halves: at most one half may match it
    true = np.zeros((2, 4), np.int32)
    true[:, :] = 1
    pred = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    scores = object_scores(pred, true, iou_threshold=0.5)
    assert scores.true_positives == 1 and scores.false_positives == 1


def test_rand_error_by_hand(two_squares):
    _, true = two_squares
    merged = (true > 0).astype(np.int32)  # both squares in one segment
    # n = [[4, 4]], pairs P(n) = n (n - 1): sum P(n_ij) = 24, sum P(t_j) = 24,
    # sum P(s_i) = 56 -> V = 48 / 80
    scores = rand_scores(merged, true)
    assert scores["split"] == pytest.approx(1.0) and scores["merge"] == pytest.approx(24 / 56)
    assert rand_error(merged, true) == pytest.approx(1 - 48 / 80)
    assert rand_error(true, true) == pytest.approx(0.0)
    # half of a square predicted as background: 2 pixels in a segment, 2 singletons
    half = true.copy()
    half[0, 0:2] = 0
    half[2:4, 4:6] = 0
    # square 1: a 2-pixel segment and 2 singletons; square 2: 4 singletons. Singletons make
    # no pairs: sum P(n_ij) = 2, sum P(s_i) = 2, sum P(t_j) = 12 + 12
    assert rand_error(half, true) == pytest.approx(1 - 2 * 2 / (2 + 24))


def test_best_rand_error_picks_the_threshold_that_separates():
    true = np.zeros((4, 9), np.int32)
    true[:, 0:4], true[:, 5:9] = 1, 2
    prob = np.where(true > 0, 0.9, 0.0)
    prob[1:3, 4] = 0.6  # a weak bridge between the two cells
    result = best_rand_error([prob], [true], thresholds=[0.5, 0.7])
    merged = np.where(prob > 0.5, 1, 0)
    assert result["by_threshold"][0.5] == pytest.approx(rand_error(merged, true))
    assert result["by_threshold"][0.5] > 0.3
    assert result["threshold"] == 0.7 and result["rand_error"] == pytest.approx(0.0)


def brute_force_rand_error(pred, true):
    """Rand F-score over ordered pairs of distinct pixels of true foreground, predicted
    background pixels being each its own segment."""
    pixels = np.flatnonzero(true.ravel() > 0)
    p = np.where(pred.ravel() > 0, pred.ravel(), -1 - np.arange(pred.size))[pixels]
    t = true.ravel()[pixels]
    same_both = same_pred = same_true = 0
    for i, j in itertools.permutations(range(len(pixels)), 2):
        same_pred += p[i] == p[j]
        same_true += t[i] == t[j]
        same_both += (p[i] == p[j]) and (t[i] == t[j])
    return 1 - 2 * same_both / (same_pred + same_true)


@pytest.mark.parametrize("seed", range(4))
def test_rand_error_matches_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 4, (5, 6))
    pred = rng.integers(0, 5, (5, 6))
    assert rand_error(pred, true) == pytest.approx(brute_force_rand_error(pred, true))


def test_contingency_counts_pairs():
    pred = np.array([[0, 1], [1, 2]])
    true = np.array([[1, 1], [0, 1]])
    np.testing.assert_array_equal(contingency(pred, true), [[0, 1], [1, 1], [0, 1]])


def test_counts():
    labels = np.array([[0, 3, 3], [7, 0, 0]])
    assert count_objects(labels) == 2
    assert count_error(9, 10) == {"absolute": 1.0, "relative": pytest.approx(0.1)}
    assert count_error(0, 0)["relative"] == 0.0
    assert count_error(2, 0)["relative"] == float("inf")
    report = segmentation_report(labels, labels)
    assert report["f1"] == 1.0 and report["count_error"] == 0 and report["iou"] == 1.0


# --- post-processing ------------------------------------------------------------------------


def disc(shape, center, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def test_h_maxima_keeps_peaks_by_their_dynamic():
    profile = np.array([0, 3, 5, 3, 4, 3, 0], float)  # peaks 5 and 4, saddle 3
    image = np.tile(profile, (3, 1))
    np.testing.assert_array_equal(h_maxima(image, 0.5)[1], [0, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(h_maxima(image, 1.5)[1], [0, 0, 1, 0, 0, 0, 0])


def test_touching_discs_are_separated():
    mask = disc((40, 60), (20, 20), 11) | disc((40, 60), (20, 39), 10)  # overlapping discs
    labels = label_instances(mask.astype(np.float32), gap_width=0)
    assert labels.max() == 2
    truth = np.zeros(mask.shape, np.int32)
    truth[disc(mask.shape, (20, 20), 11)] = 1
    truth[disc(mask.shape, (20, 39), 10) & (truth == 0)] = 2
    assert object_scores(labels, truth, iou_threshold=0.8).f1 == 1.0
    assert label_instances(mask.astype(np.float32), separate=False).max() == 1


def test_flood_does_not_wrap_around_the_image():
    mask = np.zeros((5, 9), bool)
    mask[1:4, 0:3] = mask[1:4, 6:9] = True
    markers = np.zeros((5, 9), np.int32)
    markers[2, 1], markers[2, 7] = 1, 2
    labels = flood_from_markers(mask.astype(float), markers, mask)
    assert set(np.unique(labels[:, :3][mask[:, :3]])) == {1}
    assert set(np.unique(labels[:, 6:][mask[:, 6:]])) == {2}


def test_fill_separation_gaps_undoes_carving():
    labels = np.zeros((8, 10), np.int32)
    labels[1:7, 1:5], labels[1:7, 5:9] = 1, 2
    carved = carve_separation_borders(labels)
    assert (carved != labels).sum() == 6
    filled = fill_separation_gaps(carved)
    assert np.all(filled[labels > 0] > 0)  # the gap is closed...
    assert ((filled > 0) & (labels == 0)).sum() <= 2  # ...up to its two end pixels
    assert object_scores(filled, labels, iou_threshold=0.7).f1 == 1.0  # cells stay apart
    lone = np.zeros((6, 6), np.int32)
    lone[2:4, 2:4] = 1
    np.testing.assert_array_equal(fill_separation_gaps(lone), lone)  # no neighbour: no change


def test_count_cells_on_carved_synthetic_masks():
    _, labels = synthetic_cells(2, size=128, seed=11)
    for truth in labels:
        prob = (carve_separation_borders(truth) > 0).astype(np.float32)
        result = count_cells(np.stack([1 - prob, prob]))
        assert result.count == count_objects(truth)
        assert object_scores(result.labels, truth).f1 == 1.0
        assert iou(result.labels, truth) > 0.97
        assert result.labels.dtype == np.int32


def test_foreground_probability_and_errors():
    prob = np.random.default_rng(0).random((3, 4, 4))
    np.testing.assert_allclose(foreground_probability(prob), 1 - prob[0], rtol=1e-6)
    with pytest.raises(ValueError, match="prob"):
        foreground_probability(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="threshold"):
        label_instances(np.zeros((4, 4)), threshold=1.5)


def test_small_specks_dropped_and_small_holes_filled():
    prob = disc((30, 30), (15, 15), 8).astype(np.float32)
    prob[15, 15] = 0  # a one-pixel hole
    prob[1, 1] = 1  # a one-pixel speck
    labels = label_instances(prob, min_size=5)
    assert labels.max() == 1 and labels[15, 15] == 1 and labels[1, 1] == 0
    ring = disc((40, 40), (20, 20), 15) & ~disc((40, 40), (20, 20), 6)  # a large hole stays
    assert label_instances(ring.astype(np.float32), min_size=5, separate=False)[20, 20] == 0


def test_a_faint_boundary_in_the_probability_splits_a_shallow_neck():
    from minunet.postprocess import split_touching

    mask = disc((30, 44), (15, 17), 10) | disc((30, 44), (15, 27), 10)  # a shallow neck
    assert split_touching(mask, h=2.0).max() == 1
    confidence = np.ones(mask.shape)
    confidence[:, 22] = 0.4  # the network hesitated along the boundary column
    labels = split_touching(mask, h=2.0, confidence=confidence)
    assert labels.max() == 2
    assert set(np.unique(labels[:, :21][mask[:, :21]])) == {1}


def test_nan_probabilities_are_refused_instead_of_hanging(rng, time_limit):
    """Reconstruction waits for "nothing changes", which NaN (never equal to itself) would
    never reach: NaN is refused up front."""
    prob = rng.random((24, 24))
    prob[3, 4] = np.nan
    with time_limit(30), pytest.raises(ValueError, match="1 NaN"):
        label_instances(prob)
    with time_limit(30), pytest.raises(ValueError, match="NaN"):
        reconstruct_by_dilation(prob - 0.5, prob)
