"""Losses against PyTorch: values and gradients (autograd as the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from minunet import losses


def _torch_grad(fn, z):
    """Value and autograd gradient of the scalar ``fn(z_tensor)`` at the array ``z``."""
    zt = torch.tensor(z, requires_grad=True)
    value = fn(zt)
    value.backward()
    return value.item(), zt.grad.numpy()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_softmax_cross_entropy_matches_torch(rng, weighted, dtype, rtol):
    logits = (rng.standard_normal((2, 3, 5, 4)) * 4).astype(dtype)
    target = rng.integers(0, 3, size=(2, 5, 4))
    weight = rng.uniform(0.1, 10, size=(2, 5, 4)).astype(dtype) if weighted else None

    def reference(z):
        per_pixel = TF.cross_entropy(z, torch.from_numpy(target), reduction="none")
        if weighted:
            per_pixel = per_pixel * torch.from_numpy(weight)
        return per_pixel.mean()

    loss, grad = losses.softmax_cross_entropy(logits, target, weight)
    expected_loss, expected_grad = _torch_grad(reference, logits)
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == logits.shape
    np.testing.assert_allclose(float(loss), expected_loss, rtol=rtol)
    np.testing.assert_allclose(grad, expected_grad, rtol=rtol * 10, atol=rtol * 1e-2)


def test_softmax_cross_entropy_unweighted_equals_torch_default_mean(rng):
    logits = rng.standard_normal((3, 4, 6, 6))
    target = rng.integers(0, 4, size=(3, 6, 6))
    loss, _ = losses.softmax_cross_entropy(logits, target)
    expected = TF.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target))
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-12)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[[[1000.0]], [[-1000.0]]]])  # (1, 2, 1, 1)
    loss, grad = losses.softmax_cross_entropy(logits, np.array([[[1]]]))
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(float(loss), 2000.0)
    np.testing.assert_allclose(grad[0, :, 0, 0], [1.0, -1.0])


def test_softmax_cross_entropy_does_not_mutate_inputs(rng):
    logits = rng.standard_normal((1, 2, 3, 3))
    target = rng.integers(0, 2, size=(1, 3, 3))
    weight = rng.uniform(size=(1, 3, 3))
    copies = [a.copy() for a in (logits, target, weight)]
    losses.softmax_cross_entropy(logits, target, weight)
    for before, after in zip(copies, (logits, target, weight), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "target, weight, error, match",
    [
        (np.zeros((1, 3, 3)), None, TypeError, "integer"),
        (np.zeros((1, 3, 4), int), None, ValueError, "shape"),
        (np.full((1, 3, 3), 2), None, ValueError, r"\[0, 2\)"),
        (np.full((1, 3, 3), -1), None, ValueError, r"\[0, 2\)"),
        (np.zeros((1, 3, 3), int), np.ones((1, 3, 4)), ValueError, "weight"),
        (np.zeros((1, 3, 3), int), np.ones((1, 3, 3), int), TypeError, "weight"),
    ],
)
def test_softmax_cross_entropy_rejects_bad_input(target, weight, error, match):
    with pytest.raises(error, match=match):
        losses.softmax_cross_entropy(np.zeros((1, 2, 3, 3)), target, weight)


def test_losses_keep_the_logits_dtype(rng):
    logits = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    weight = rng.uniform(size=(1, 3, 3))  # float64
    loss, grad = losses.softmax_cross_entropy(logits, rng.integers(0, 2, (1, 3, 3)), weight)
    assert loss.dtype == grad.dtype == np.float32
    loss, grad = losses.binary_cross_entropy_with_logits(logits, rng.uniform(size=logits.shape),
                                                         rng.uniform(size=logits.shape))
    assert loss.dtype == grad.dtype == np.float32


def test_softmax_matches_torch(rng):
    z = rng.standard_normal((2, 5, 3, 3)) * 30
    np.testing.assert_allclose(losses.softmax(z), torch.softmax(torch.from_numpy(z), 1).numpy(),
                               rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(losses.softmax(z).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_binary_cross_entropy_with_logits_matches_torch(rng, weighted):
    z = rng.standard_normal((2, 1, 5, 5)) * 20  # includes large |z|: the stable form matters
    t = rng.uniform(size=z.shape)
    w = rng.uniform(0.5, 3, size=z.shape) if weighted else None
    loss, grad = losses.binary_cross_entropy_with_logits(z, t, w)
    expected_loss, expected_grad = _torch_grad(
        lambda zt: TF.binary_cross_entropy_with_logits(
            zt, torch.from_numpy(t), weight=None if w is None else torch.from_numpy(w)), z)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-18)


def _torch_dice(probs, one_hot, eps):
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims) + eps
    return 1 - ((2 * intersection + eps) / total).mean()


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("integer_target", [True, False])
def test_soft_dice_matches_torch_autograd(rng, from_logits, integer_target):
    scores = rng.standard_normal((2, 3, 6, 5))
    if not from_logits:
        scores = torch.softmax(torch.from_numpy(scores), 1).numpy()
    labels = rng.integers(0, 3, size=(2, 6, 5))
    one_hot = np.moveaxis(np.eye(3)[labels], -1, 1)
    target = labels if integer_target else one_hot

    def reference(st):
        probs = torch.softmax(st, 1) if from_logits else st
        return _torch_dice(probs, torch.from_numpy(one_hot), 0.5)

    loss, grad = losses.soft_dice(scores, target, eps=0.5, from_logits=from_logits)
    expected_loss, expected_grad = _torch_grad(reference, scores)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-15)


def test_soft_dice_keeps_float32(rng):
    loss, grad = losses.soft_dice(rng.standard_normal((1, 2, 4, 4)).astype(np.float32),
                                  rng.integers(0, 2, size=(1, 4, 4)))
    assert loss.dtype == np.float32 and grad.dtype == np.float32


def test_soft_dice_rejects_bad_input(rng):
    with pytest.raises(ValueError, match="eps"):
        losses.soft_dice(np.zeros((1, 2, 3, 3)), np.zeros((1, 3, 3), int), eps=0)
    with pytest.raises(ValueError, match="shape"):
        losses.soft_dice(np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 3, 4)))
