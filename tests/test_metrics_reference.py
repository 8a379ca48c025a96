"""minunet's segmentation metrics and post-processing against scikit-image's reference
implementations."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import adapted_rand_error
from skimage.metrics import variation_of_information as skimage_vi
from skimage.morphology import h_maxima as skimage_h_maxima
from skimage.segmentation import watershed
from sklearn.metrics import accuracy_score, f1_score

from minunet.data import boundary_classes, synthetic_cells
from minunet.metrics import (
    best_pixel_error,
    best_rand_error,
    class_scores,
    merges_and_splits,
    rand_scores,
    variation_of_information,
)
from minunet.postprocess import h_maxima, label_boundary_classes, split_touching


def singletons_as_labels(pred):
    """``pred`` with every background pixel given a label of its own: the convention of
    minunet's foreground-restricted scores, expressed for scikit-image."""
    unique = pred.astype(np.int64).copy()
    background = unique == 0
    unique[background] = unique.max() + 1 + np.arange(background.sum())
    return unique


def label_pairs(seed):
    rng = np.random.default_rng(seed)
    truth = ndimage.label(rng.random((48, 40)) > 0.35)[0]
    pred = truth.copy()
    pred[rng.random(pred.shape) < 0.1] = 0  # missed pixels
    pred[(pred == 2) | (pred == 3)] = 2  # a merge
    pred[:, :5] = rng.integers(0, 30, (48, 5))  # noise
    return pred, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rand_scores_equal_skimage_adapted_rand_error(seed):
    pred, truth = label_pairs(seed)
    error, precision, recall = adapted_rand_error(truth, singletons_as_labels(pred),
                                                  ignore_labels=(0,))
    scores = rand_scores(pred, truth)
    assert scores["rand_error"] == pytest.approx(error, rel=1e-12, abs=1e-12)
    # scikit-image's "precision" normalises by the true segments' pairs: minunet's split
    assert scores["split"] == pytest.approx(precision, rel=1e-12)
    assert scores["merge"] == pytest.approx(recall, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_variation_of_information_equals_skimage(seed):
    pred, truth = label_pairs(seed)
    false_splits, false_merges = skimage_vi(truth, singletons_as_labels(pred),
                                            ignore_labels=(0,))
    vi = variation_of_information(pred, truth)
    assert vi["split"] == pytest.approx(false_splits, rel=1e-10)
    assert vi["merge"] == pytest.approx(false_merges, rel=1e-10)
    assert vi["vi"] == pytest.approx(false_splits + false_merges, rel=1e-10)


def test_perfect_segmentation_scores_zero_error():
    _, truth = label_pairs(4)
    assert rand_scores(truth, truth)["rand_error"] == pytest.approx(0, abs=1e-15)
    assert variation_of_information(truth, truth)["vi"] == pytest.approx(0, abs=1e-12)


def test_best_rand_error_is_the_minimum_over_thresholds():
    _, truth = label_pairs(5)
    rng = np.random.default_rng(5)
    prob = np.clip((truth > 0) * 0.7 + rng.normal(0, 0.2, truth.shape), 0, 1)
    result = best_rand_error([prob], [truth], thresholds=[0.3, 0.5, 0.7])
    expected = {t: adapted_rand_error(truth, singletons_as_labels(ndimage.label(prob > t)[0]),
                                      ignore_labels=(0,))[0] for t in (0.3, 0.5, 0.7)}
    best = min(expected, key=expected.get)
    assert result["threshold"] == best
    assert result["rand_error"] == pytest.approx(expected[best], rel=1e-12)


def test_best_pixel_error_is_one_minus_the_best_f_score_over_all_images():
    rng = np.random.default_rng(7)
    truths = [np.where(rng.random((20, 24)) > 0.3, 255, 0).astype(np.uint8) for _ in range(3)]
    probs = [np.clip((t > 0) * 0.5 + rng.random(t.shape) * 0.6, 0, 1) for t in truths]
    thresholds = [0.2, 0.4, 0.6, 0.8]
    result = best_pixel_error(probs, truths, thresholds)
    truth = np.concatenate([t.ravel() > 0 for t in truths])
    prob = np.concatenate([p.ravel() for p in probs])
    expected = {t: 1 - f1_score(truth, prob > t) for t in thresholds}
    assert result["by_threshold"] == pytest.approx(expected, rel=1e-12)
    best = min(expected, key=expected.get)
    assert result["threshold"] == best
    assert result["pixel_error"] == pytest.approx(expected[best], rel=1e-12)
    assert result["misclassified"] == pytest.approx(1 - accuracy_score(truth, prob > best))
    assert result["pixel_error"] < result["misclassified"]  # F counts true positives twice


def test_best_pixel_error_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="same non-zero number"):
        best_pixel_error([np.zeros((4, 4))], [])
    with pytest.raises(ValueError, match="same shape"):
        best_pixel_error([np.zeros((4, 4))], [np.zeros((4, 5), np.uint8)])


def test_merges_and_splits_count_touching_instances():
    truth = np.zeros((20, 30), int)
    truth[2:10, 2:10], truth[2:10, 10:18], truth[12:18, 2:25] = 1, 2, 3
    pred = np.zeros_like(truth)
    pred[2:10, 2:18] = 1  # nuclei 1 and 2 merged
    pred[12:18, 2:12], pred[12:18, 12:25] = 2, 3  # nucleus 3 split in two
    assert merges_and_splits(pred, truth) == {"merges": 1, "splits": 1}
    assert merges_and_splits(truth, truth) == {"merges": 0, "splits": 0}


def test_class_scores_per_class_iou():
    true = np.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    pred = np.array([[0, 1, 2, 2], [0, 1, 2, 0]])
    scores = class_scores(pred, true, 3)
    assert scores["iou_1"] == pytest.approx(2 / 3)
    assert scores["iou_2"] == pytest.approx(2 / 4)
    assert scores["iou"] == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert scores["pixel_error"] == pytest.approx(2 / 8)


def smooth_landscape(seed):
    rng = np.random.default_rng(seed)
    return np.round(ndimage.gaussian_filter(rng.random((60, 60)), 4) * 2000)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("h", [2.0, 6.0])
def test_h_maxima_finds_the_peaks_skimage_finds(seed, h):
    """scikit-image marks the very top of every hill of dynamic >= h; minunet marks the
    region of that hill within h of its top (the extended maximum): the same hills, one
    marker region each, each holding exactly one of scikit-image's tops."""
    image = smooth_landscape(seed)
    eight = np.ones((3, 3))
    tops = skimage_h_maxima(image, h, footprint=eight) > 0
    ours = h_maxima(image, h)
    regions, count = ndimage.label(ours, structure=eight)
    top_regions, top_count = ndimage.label(tops, structure=eight)
    assert count == top_count > 1
    assert np.all(ours[tops])
    # every region holds exactly one top
    holders = {int(regions[top_regions == t][0]) for t in range(1, top_count + 1)}
    assert holders == set(range(1, count + 1))


def test_split_touching_agrees_with_skimage_watershed():
    _, labels = synthetic_cells(1, 96, seed=3)
    mask = labels[0] > 0
    ours = split_touching(mask, h=1.0, smoothing=0.0)
    distance = ndimage.distance_transform_edt(mask)
    markers = ndimage.label(h_maxima(distance, 1.0) & mask, structure=np.ones((3, 3)))[0]
    reference = watershed(-distance, markers, mask=mask, connectivity=1)
    # same cells, and the same pixels in them up to the exact course of the dividing lines
    assert ours.max() >= reference.max()
    matched = sum(np.bincount(ours[reference == r]).max() for r in range(1, reference.max() + 1))
    assert matched / mask.sum() > 0.97


def test_boundary_classes_and_back_to_instances():
    _, labels = synthetic_cells(1, 96, seed=4)
    labels = labels[0]
    classes = boundary_classes(labels, width=2)
    assert set(np.unique(classes)) <= {0, 1, 2}
    np.testing.assert_array_equal(classes > 0, labels > 0)
    # a perfect three-class prediction gives back every cell that has an interior
    prob = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1)
    found = label_boundary_classes(prob, min_size=1)
    with_interior = np.unique(labels[classes == 1]).size
    assert found.max() == with_interior
    assert merges_and_splits(found, labels) == {"merges": 0, "splits": 0}
