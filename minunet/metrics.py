"""Segmentation metrics: pixel overlap (IoU, Dice, pixel error), the ISBI 2012 Rand error,
object-level detection scores, and cell-count errors.

Conventions: ``pred`` and ``target`` masks are arrays of the same shape where ``> 0`` means
foreground; label images are integer arrays with 0 = background and one positive id per
object. All scores are Python floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment


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
    """Fraction of pixels whose foreground/background class is wrong (ISBI 2012 pixel error)."""
    p, t = (a > 0 for a in _pair(pred, target))
    return float(np.mean(p != t)) if p.size else 0.0


def contingency(pred_labels, true_labels) -> np.ndarray:
    """``n[i, j]`` = number of pixels with predicted label ``i`` and true label ``j``
    (int64, shape ``(max_pred + 1, max_true + 1)``, row/column 0 = background)."""
    pred, true = (_labels(a, n) for a, n in zip(_pair(pred_labels, true_labels, "label images"),
                                                ("pred_labels", "true_labels"), strict=True))
    columns = int(true.max(initial=0)) + 1
    rows = int(pred.max(initial=0)) + 1
    flat = np.bincount((pred * columns + true).ravel(), minlength=rows * columns)
    return flat.reshape(rows, columns)


def rand_scores(pred_labels, true_labels) -> dict[str, float]:
    """Foreground-restricted Rand scores (Arganda-Carreras et al. 2015, the ISBI 2012 metric).

    Only pixels with a true label ``> 0`` are scored (true background/membrane is ignored).
    Among them, ``n_ij`` counts pixels in predicted segment ``i`` and true segment ``j``;
    predicted background pixels (label 0) count as singleton segments, one per pixel, so
    missing a cell is penalised as splitting it into single pixels. With ``s_i = sum_j n_ij``
    and ``t_j = sum_i n_ij``::

        split = sum n_ij^2 / sum t_j^2      (1 when no true segment is split)
        merge = sum n_ij^2 / sum s_i^2      (1 when no predicted segment merges true ones)
        V_rand = 2 / (1/split + 1/merge) = 2 sum n_ij^2 / (sum s_i^2 + sum t_j^2)

    Returns ``{"split", "merge", "v_rand", "rand_error"}`` with ``rand_error = 1 - V_rand``.
    """
    table = contingency(pred_labels, true_labels)[:, 1:].astype(np.float64)  # true fg only
    singletons = table[0]  # predicted background: every pixel its own segment
    segments = table[1:]
    sum_squares = (segments**2).sum() + singletons.sum()
    sum_pred = (segments.sum(axis=1) ** 2).sum() + singletons.sum()
    sum_true = (table.sum(axis=0) ** 2).sum()
    if sum_true == 0:
        return {"split": 1.0, "merge": 1.0, "v_rand": 1.0, "rand_error": 0.0}
    v_rand = 2 * sum_squares / (sum_pred + sum_true)
    return {"split": float(sum_squares / sum_true), "merge": float(sum_squares / sum_pred),
            "v_rand": float(v_rand), "rand_error": float(1 - v_rand)}


def rand_error(pred_labels, true_labels) -> float:
    """``1 - V_rand`` of :func:`rand_scores`."""
    return rand_scores(pred_labels, true_labels)["rand_error"]


def best_rand_error(foreground_probabilities, true_labels, thresholds=None) -> dict:
    """The ISBI 2012 protocol: threshold the foreground probability maps, take 4-connected
    components as segments, and report the smallest mean :func:`rand_error` over thresholds
    (one threshold for all images), i.e. ``1 -`` the maximal Rand F-score.

    ``foreground_probabilities`` and ``true_labels``: sequences of (H, W) arrays.
    Returns ``{"rand_error", "threshold", "by_threshold": {threshold: mean error}}``.
    """
    thresholds = np.round(np.arange(0.1, 0.95, 0.1), 2) if thresholds is None else thresholds
    if len(foreground_probabilities) != len(true_labels) or not len(true_labels):
        raise ValueError("need the same non-zero number of probability maps and label images")
    by_threshold = {
        float(t): float(np.mean([rand_error(ndimage.label(p > t)[0], truth) for p, truth
                                 in zip(foreground_probabilities, true_labels, strict=True)]))
        for t in thresholds
    }
    best = min(by_threshold, key=by_threshold.get)
    return {"rand_error": by_threshold[best], "threshold": best, "by_threshold": by_threshold}


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
