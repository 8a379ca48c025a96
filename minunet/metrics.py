"""Segmentation metrics: pixel overlap (IoU, Dice, pixel error), the ISBI 2012 pixel and
Rand errors, object-level detection scores, and cell-count errors.

Conventions: ``pred`` and ``target`` masks are arrays of the same shape where ``> 0`` means
foreground; label images are integer arrays with 0 = background and one positive id per
object. All scores are Python floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import watershed


def _pair(pred, target, what="masks") -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target {what} must have the same shape, "
                         f"got {pred.shape} and {target.shape}")
    return pred, target


def _labels(array, name) -> np.ndarray:
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise TypeError(f"{name} must be an integer label image, got {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be >= 0 (0 = background)")
    return array.astype(np.int64)


def iou(pred, target) -> float:
    """Foreground intersection over union ``|P & T| / |P | T|`` (1.0 when both are empty)."""
    p, t = (a > 0 for a in _pair(pred, target))
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def dice(pred, target) -> float:
    """Dice coefficient ``2 |P & T| / (|P| + |T|)`` (1.0 when both are empty)."""
    p, t = (a > 0 for a in _pair(pred, target))
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(p, t).sum() / total)


def pixel_error(pred, target) -> float:
    """Fraction of pixels whose foreground/background class is wrong (the misclassified
    fraction; the ISBI 2012 challenge scored ``1 -`` an F-score instead, see
    :func:`best_pixel_error`)."""
    p, t = (a > 0 for a in _pair(pred, target))
    return float(np.mean(p != t)) if p.size else 0.0


def class_scores(pred_classes, true_classes, num_classes: int) -> dict[str, float]:
    """Per-class scores of a class-index prediction: ``iou_<c>`` for every class
    ``c = 1 .. num_classes - 1`` (1.0 where the class is absent from both), ``iou`` their
    mean, and ``pixel_error``, the fraction of pixels given the wrong class."""
    pred, true = _pair(pred_classes, true_classes)
    scores = {}
    for c in range(1, num_classes):
        scores[f"iou_{c}"] = iou(pred == c, true == c)
    scores["iou"] = float(np.mean(list(scores.values())))
    scores["pixel_error"] = float(np.mean(pred != true)) if pred.size else 0.0
    return scores


def contingency(pred_labels, true_labels) -> np.ndarray:
    """``n[i, j]`` = number of pixels with predicted label ``i`` and true label ``j``
    (int64, shape ``(max_pred + 1, max_true + 1)``, row/column 0 = background)."""
    pred, true = (_labels(a, n) for a, n in zip(_pair(pred_labels, true_labels, "label images"),
                                                ("pred_labels", "true_labels"), strict=True))
    columns = int(true.max(initial=0)) + 1
    rows = int(pred.max(initial=0)) + 1
    flat = np.bincount((pred * columns + true).ravel(), minlength=rows * columns)
    return flat.reshape(rows, columns)


def _foreground_table(pred_labels, true_labels) -> tuple[np.ndarray, np.ndarray]:
    """``(segments, singletons)``: the contingency table restricted to true foreground
    (rows: predicted segments 1.., columns: true segments 1..), and per true segment the
    number of its pixels predicted as background, each of which counts as a segment of its
    own (so that missing a cell is scored as shattering it, not as merging it with all
    other misses)."""
    table = contingency(pred_labels, true_labels)[:, 1:].astype(np.float64)
    return table[1:], table[0]


def rand_scores(pred_labels, true_labels) -> dict[str, float]:
    """Foreground-restricted Rand scores (Arganda-Carreras et al. 2015, the ISBI 2012 metric).

    Only pixels with a true label ``> 0`` are scored (true background/membrane is ignored).
    Among them, ``n_ij`` counts pixels in predicted segment ``i`` and true segment ``j``;
    predicted background pixels (label 0) count as singleton segments, one per pixel. The
    scores count *pairs* of distinct pixels: with ``s_i = sum_j n_ij``, ``t_j = sum_i n_ij``
    and ``P(n) = n (n - 1)`` (ordered pairs among ``n`` pixels)::

        split = sum P(n_ij) / sum P(t_j)    (1 when no true segment is split; "recall")
        merge = sum P(n_ij) / sum P(s_i)    (1 when no predicted segment merges; "precision")
        V_rand = 2 / (1/split + 1/merge)    (the Rand F-score)

    Returns ``{"split", "merge", "v_rand", "rand_error"}`` with ``rand_error = 1 - V_rand``:
    ``skimage.metrics.adapted_rand_error`` with the predicted background given one label
    per pixel.
    """
    segments, singletons = _foreground_table(pred_labels, true_labels)
    true_sizes = segments.sum(axis=0) + singletons
    joint = (segments * (segments - 1)).sum()
    pred_sizes = segments.sum(axis=1)
    sum_pred = (pred_sizes * (pred_sizes - 1)).sum()
    sum_true = (true_sizes * (true_sizes - 1)).sum()
    if sum_true == 0 and sum_pred == 0:
        return {"split": 1.0, "merge": 1.0, "v_rand": 1.0, "rand_error": 0.0}
    v_rand = 2 * joint / (sum_pred + sum_true)
    return {"split": float(joint / sum_true) if sum_true else 1.0,
            "merge": float(joint / sum_pred) if sum_pred else 1.0,
            "v_rand": float(v_rand), "rand_error": float(1 - v_rand)}


def variation_of_information(pred_labels, true_labels) -> dict[str, float]:
    """Foreground-restricted variation of information (Meila 2007), in bits (as
    ``skimage.metrics.variation_of_information``), over the same pixels and with the same
    singleton rule as :func:`rand_scores`.

    ``split = H(pred | true)``: the information needed to recover the prediction from the
    truth, large when true segments are cut into pieces; ``merge = H(true | pred)``, large
    when predicted segments join true ones; ``vi = split + merge`` (0 for a perfect match).
    """
    segments, singletons = _foreground_table(pred_labels, true_labels)
    total = segments.sum() + singletons.sum()
    if total == 0:
        return {"split": 0.0, "merge": 0.0, "vi": 0.0}

    def entropy(counts, extra_singletons=0.0):
        p = counts[counts > 0] / total
        return float(-(p * np.log2(p)).sum() + extra_singletons / total * np.log2(total))

    lone = singletons.sum()
    joint = entropy(segments.ravel(), lone)
    pred = entropy(segments.sum(axis=1), lone)
    true = entropy(segments.sum(axis=0) + singletons)
    return {"split": joint - true, "merge": joint - pred, "vi": 2 * joint - pred - true}


def merges_and_splits(pred_labels, true_labels, majority: float = 0.5) -> dict[str, int]:
    """Object-level merge and split errors of touching instances.

    A predicted object *merges* the true objects of which it holds more than ``majority`` of
    the pixels; ``merges`` is the sum over predicted objects of (number merged - 1). A true
    object is *split* among the predicted objects that have more than ``majority`` of their
    own pixels inside it; ``splits`` is the sum over true objects of (number of pieces - 1).
    Returns ``{"merges", "splits"}``.
    """
    if not 0.5 <= majority < 1:
        raise ValueError(f"majority must be in [0.5, 1), got {majority}")
    full = contingency(pred_labels, true_labels).astype(np.float64)
    table = full[1:, 1:]
    pred_sizes, true_sizes = full[1:].sum(axis=1), full[:, 1:].sum(axis=0)
    held = table > majority * true_sizes[None, :]  # pred i holds most of true j
    inside = table > majority * pred_sizes[:, None]  # pred i lies mostly inside true j
    merged = held.sum(axis=1)
    pieces = inside.sum(axis=0)
    return {"merges": int(np.maximum(merged - 1, 0).sum()),
            "splits": int(np.maximum(pieces - 1, 0).sum())}


def rand_error(pred_labels, true_labels) -> float:
    """``1 - V_rand`` of :func:`rand_scores`."""
    return rand_scores(pred_labels, true_labels)["rand_error"]


def threshold_segments(foreground_probability, threshold: float, *, grow: bool = False):
    """Segments of a boundary map, as the ISBI 2012 protocol makes them: the 4-connected
    components of ``foreground_probability > threshold`` (int32 labels, 0 = boundary).

    With ``grow``, every component then grows over the boundary pixels by a watershed on
    the probability (scikit-image's), highest ground first, so every pixel belongs to a
    segment: a segmentation of the whole image, as connectomics evaluations expect.
    """
    segments = ndimage.label(np.asarray(foreground_probability) > threshold)[0]
    if grow:
        segments = watershed(-np.asarray(foreground_probability), segments)
    return segments.astype(np.int32)


def _checked_thresholds(foreground_probabilities, true_labels, thresholds):
    """The thresholds that :func:`best_pixel_error` and :func:`best_rand_error` try (0.1 to
    0.9 in steps of 0.1 unless given), once the maps and labels are known to pair up."""
    if len(foreground_probabilities) != len(true_labels) or not len(true_labels):
        raise ValueError("need the same non-zero number of probability maps and label images")
    return np.round(np.arange(0.1, 0.95, 0.1), 2) if thresholds is None else thresholds


def best_rand_error(foreground_probabilities, true_labels, thresholds=None, *,
                    grow: bool = False) -> dict:
    """The ISBI 2012 protocol: threshold the foreground probability maps, take the segments
    of :func:`threshold_segments` (``grow`` as there), and report the smallest mean
    :func:`rand_error` over thresholds (one threshold for all images), i.e. ``1 -`` the
    maximal Rand F-score, with the variation of information at that threshold.

    ``foreground_probabilities`` and ``true_labels``: sequences of (H, W) arrays.
    Returns ``{"rand_error", "threshold", "by_threshold": {threshold: mean error}, "vi"}``
    (``vi``: the means of :func:`variation_of_information`).
    """
    thresholds = _checked_thresholds(foreground_probabilities, true_labels, thresholds)
    truths = list(true_labels)
    segments = {float(t): [threshold_segments(p, t, grow=grow)
                           for p in foreground_probabilities] for t in thresholds}
    by_threshold = {t: float(np.mean([rand_error(found, truth)
                                      for found, truth in zip(found_all, truths, strict=True)]))
                    for t, found_all in segments.items()}
    best = min(by_threshold, key=by_threshold.get)
    vi = [variation_of_information(found, truth)
          for found, truth in zip(segments[best], truths, strict=True)]
    return {"rand_error": by_threshold[best], "threshold": best, "by_threshold": by_threshold,
            "vi": {key: float(np.mean([row[key] for row in vi])) for key in vi[0]}}


def best_pixel_error(foreground_probabilities, true_labels, thresholds=None) -> dict:
    """The ISBI 2012 challenge's pixel error, the figure of the U-Net paper's Table 1:
    ``1 -`` the maximal F-score of the foreground pixels (``true_labels > 0``, the cell
    interiors) over thresholds of the probability maps, with the true and false positives
    and negatives counted over all images together, one threshold for all.

    It is smaller than the misclassified fraction (:func:`pixel_error`) of the same masks:
    ``1 - F = (FP + FN) / (2 TP + FP + FN)``, and ``2 TP`` is about twice the foreground.

    ``foreground_probabilities`` and ``true_labels``: sequences of (H, W) arrays.
    Returns ``{"pixel_error", "threshold", "by_threshold": {threshold: 1 - F},
    "misclassified": the misclassified fraction at that threshold}``.
    """
    thresholds = _checked_thresholds(foreground_probabilities, true_labels, thresholds)
    pairs = [_pair(p, t, "probability maps and labels")
             for p, t in zip(foreground_probabilities, true_labels, strict=True)]
    truth = np.concatenate([t.ravel() > 0 for _, t in pairs])
    probability = np.concatenate([p.ravel() for p, _ in pairs])
    by_threshold, misclassified = {}, {}
    for t in (float(t) for t in thresholds):
        found = probability > t
        hits = np.count_nonzero(found & truth)
        wrong = np.count_nonzero(found != truth)  # false positives + false negatives
        by_threshold[t] = float(wrong / (2 * hits + wrong)) if hits + wrong else 0.0
        misclassified[t] = float(wrong / truth.size)
    best = min(by_threshold, key=by_threshold.get)
    return {"pixel_error": by_threshold[best], "threshold": best, "by_threshold": by_threshold,
            "misclassified": misclassified[best]}


@dataclass(frozen=True)
class ObjectScores:
    """Object-level detection scores at one IoU threshold."""

    true_positives: int
    false_positives: int
    false_negatives: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float

    def as_dict(self) -> dict:
        return asdict(self)


def object_scores(pred_labels, true_labels, iou_threshold: float = 0.5) -> ObjectScores:
    """Match predicted to true objects one-to-one and score the detection.

    Pairs are chosen to maximise the total IoU (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``); a pair counts as a true positive when its IoU is
    ``>= iou_threshold``. Unmatched predictions are false positives, unmatched true objects
    false negatives. ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
    ``f1 = 2 TP / (2 TP + FP + FN)`` (all 1.0 when there are no objects at all).
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    table = contingency(pred_labels, true_labels)
    pred_ids = np.flatnonzero(table[1:].sum(axis=1)) + 1  # labels actually present
    true_ids = np.flatnonzero(table[:, 1:].sum(axis=0)) + 1
    overlap = table[np.ix_(pred_ids, true_ids)].astype(np.float64)
    union = table[pred_ids].sum(axis=1)[:, None] + table[:, true_ids].sum(axis=0)[None] - overlap
    ious = overlap / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(-ious) if ious.size else ([], [])
    matched = ious[rows, cols] >= iou_threshold if ious.size else np.zeros(0, bool)
    tp = int(matched.sum())
    fp, fn = len(pred_ids) - tp, len(true_ids) - tp
    mean_iou = float(ious[rows, cols][matched].mean()) if tp else 0.0
    return ObjectScores(
        true_positives=tp, false_positives=fp, false_negatives=fn,
        precision=tp / (tp + fp) if tp + fp else 1.0,
        recall=tp / (tp + fn) if tp + fn else 1.0,
        f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        mean_matched_iou=mean_iou,
    )


def count_objects(labels) -> int:
    """Number of distinct positive labels (ids need not be consecutive)."""
    labels = _labels(labels, "labels")
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))


def count_error(pred_count: int, true_count: int) -> dict[str, float]:
    """``{"absolute": |pred - true|, "relative": |pred - true| / true}`` (relative is 0 when
    both are 0, ``inf`` when only the true count is 0)."""
    if pred_count < 0 or true_count < 0:
        raise ValueError(f"counts must be >= 0, got {pred_count} and {true_count}")
    absolute = abs(int(pred_count) - int(true_count))
    if true_count == 0:
        relative = 0.0 if absolute == 0 else float("inf")
    else:
        relative = absolute / true_count
    return {"absolute": float(absolute), "relative": float(relative)}


def segmentation_report(pred_labels, true_labels, iou_threshold: float = 0.5) -> dict:
    """Every metric of this module for one predicted and one true label image."""
    objects = object_scores(pred_labels, true_labels, iou_threshold)
    pred_count, true_count = count_objects(pred_labels), count_objects(true_labels)
    errors = count_error(pred_count, true_count)
    return {
        "iou": iou(pred_labels, true_labels),
        "dice": dice(pred_labels, true_labels),
        "pixel_error": pixel_error(pred_labels, true_labels),
        "rand_error": rand_error(pred_labels, true_labels),
        "precision": objects.precision,
        "recall": objects.recall,
        "f1": objects.f1,
        "pred_count": pred_count,
        "true_count": true_count,
        "count_error": errors["absolute"],
        "relative_count_error": errors["relative"],
    }
