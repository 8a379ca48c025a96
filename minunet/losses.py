"""Segmentation losses, each returning ``(loss, dL/d(input))``.

A loss is the last step of the forward pass and the first of the backward pass, so every
function here returns both the value and its gradient with respect to its first argument;
the gradient is what :meth:`minunet.UNet.backward` takes.

``loss`` is a scalar of the input's dtype (a NumPy scalar, or a 0-d CuPy array on the GPU;
``float(loss)`` gives a Python number). All functions work on NumPy and CuPy arrays alike;
on CuPy arrays :func:`softmax_cross_entropy`, the U-Net's loss, runs one CUDA kernel
(``minunet/cuda/softmax_cross_entropy.cu``).
"""

from __future__ import annotations

from minunet.backend import get_array_module
from minunet.checks import check_class_target, check_floating, check_pixel_weight
from minunet.functional._dispatch import dispatch_on_array_type


def _one_hot(target, num_classes: int, dtype, xp):
    """(N, *spatial) integer labels -> (N, C, *spatial) one-hot of ``dtype``."""
    classes = xp.arange(num_classes).reshape((1, num_classes) + (1,) * (target.ndim - 1))
    return (target[:, None] == classes).astype(dtype)


def log_softmax(logits, axis: int = 1):
    """``z - logsumexp(z)`` along ``axis``, computed stably by subtracting the maximum."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(logits, axis: int = 1):
    """``p_k = exp(z_k) / sum_j exp(z_j)`` along ``axis`` (the class axis of NCHW logits)."""
    check_floating("logits", logits)
    return get_array_module(logits).exp(log_softmax(logits, axis))


@dispatch_on_array_type
def softmax_cross_entropy(logits, target, weight=None):
    """Pixel-wise softmax followed by (weighted) cross-entropy, the U-Net paper's Eq. (1).

    logits (N, C, H, W) float, target (N, H, W) integer class indices in [0, C),
    weight (N, H, W) float or None (the paper's weight map ``w(x)``). With M = N*H*W::

        loss = (1/M) * sum_pixels  w(x) * (-log p_{target(x)}(x))
        dL/dz_k(x) = (1/M) * w(x) * (p_k(x) - [k == target(x)])

    The loss is a *mean over pixels* of the weighted per-pixel losses (sum divided by the
    number of pixels). This differs from ``torch.nn.functional.cross_entropy(weight=...)``,
    whose weights are per class and whose mean divides by the sum of the weights; it equals
    ``(F.cross_entropy(logits, target, reduction='none') * weight).mean()``.
    Any number of spatial axes works (shapes (N, C, *S) and (N, *S)).
    """
    check_class_target(logits, target)
    check_pixel_weight(weight, target.shape)
    xp = get_array_module(logits, target, weight)
    log_p = log_softmax(logits, axis=1)
    one_hot = _one_hot(target, logits.shape[1], logits.dtype, xp)
    pixel_loss = -(log_p * one_hot).sum(axis=1)  # -log p_target, shape (N, *S)
    grad = xp.exp(log_p) - one_hot
    if weight is not None:
        weight = weight.astype(logits.dtype, copy=False)  # results keep the logits' dtype
        pixel_loss = pixel_loss * weight
        grad = grad * weight[:, None]
    num_pixels = target.size
    return pixel_loss.mean(), grad / logits.dtype.type(num_pixels)


def binary_cross_entropy_with_logits(logits, target, weight=None):
    """Sigmoid + binary cross-entropy, mean over all elements.

    logits, target, weight: same shape (any), target float in [0, 1]. With ``s = sigmoid(z)``::

        loss = mean( w * -(t*log s + (1-t)*log(1-s)) )
             = mean( w * (max(z, 0) - z*t + log(1 + exp(-|z|))) )   (stable form)
        dL/dz = w * (s - t) / M

    as ``torch.nn.functional.binary_cross_entropy_with_logits(z, t, weight=w)``.
    """
    check_floating("logits", logits)
    check_floating("target", target)
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"target must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    check_pixel_weight(weight, logits.shape)
    xp = get_array_module(logits, target, weight)
    target = target.astype(logits.dtype, copy=False)  # results keep the logits' dtype
    elementwise = (xp.maximum(logits, 0) - logits * target
                   + xp.log1p(xp.exp(-xp.abs(logits))))
    # sigmoid without overflow: exp(-|z|) is always <= 1
    e = xp.exp(-xp.abs(logits))
    sigmoid = xp.where(logits >= 0, 1 / (1 + e), e / (1 + e))
    grad = sigmoid - target
    if weight is not None:
        weight = weight.astype(logits.dtype, copy=False)
        elementwise = elementwise * weight
        grad = grad * weight
    return elementwise.mean(), grad / logits.dtype.type(logits.size)


def soft_dice(scores, target, eps: float = 1.0, from_logits: bool = True):
    """Soft Dice loss, averaged over classes (Milletari et al. 2016, in the multi-class form).

    scores (N, C, *S): logits (``from_logits=True``, softmax applied over C) or probabilities.
    target: integer labels (N, *S) or a float (e.g. one-hot) array of the scores' shape.
    For each class c, with sums over the batch and all pixels::

        I_c = sum p_c t_c,   S_c = sum p_c + sum t_c + eps,   D_c = (2 I_c + eps) / S_c
        loss = 1 - mean_c D_c
        dL/dp_c = -(1/C) * (2 t_c S_c - (2 I_c + eps)) / S_c**2

    and, through the softmax, ``dL/dz_k = p_k * (dL/dp_k - sum_c p_c dL/dp_c)``.
    Returns ``(loss, dL/d(scores))``.
    """
    check_floating("scores", scores)
    xp = get_array_module(scores, target)
    if scores.ndim < 2:
        raise ValueError(f"scores must be (N, C, ...), got shape {tuple(scores.shape)}")
    if hasattr(target, "dtype") and target.dtype.kind in "iu":
        check_class_target(scores, target)
        target = _one_hot(target, scores.shape[1], scores.dtype, xp)
    else:
        check_floating("target", target)
        if tuple(target.shape) != tuple(scores.shape):
            raise ValueError(f"a float target must have the scores' shape "
                             f"{tuple(scores.shape)}, got {tuple(target.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be positive (it keeps empty classes finite), got {eps!r}")
    probs = softmax(scores, axis=1) if from_logits else scores
    reduce_axes = (0,) + tuple(range(2, scores.ndim))
    intersection = (probs * target).sum(axis=reduce_axes, keepdims=True)
    total = probs.sum(axis=reduce_axes, keepdims=True) + target.sum(axis=reduce_axes,
                                                                   keepdims=True) + eps
    dice = (2 * intersection + eps) / total
    num_classes = scores.shape[1]
    loss = 1 - dice.mean()
    grad_probs = -(2 * target * total - (2 * intersection + eps)) / (total**2 * num_classes)
    if from_logits:
        grad = probs * (grad_probs - (probs * grad_probs).sum(axis=1, keepdims=True))
    else:
        grad = grad_probs
    return loss.astype(scores.dtype), grad.astype(scores.dtype)


__all__ = [
    "softmax", "log_softmax", "softmax_cross_entropy", "binary_cross_entropy_with_logits",
    "soft_dice",
]
