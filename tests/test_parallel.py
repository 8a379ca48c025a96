"""minunet.parallel.BatchSplit: the batch split across threads gives the PyTorch twin's
outputs and gradients, leaves BLAS's thread count as it found it, and runs unsplit where
the images are not independent."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from _unet_oracle import assert_close_to, assert_gradients_match, twin_networks

from minunet import UNet
from minunet.functional import blas
from minunet.parallel import BatchSplit

SMALL = dict(in_channels=2, num_classes=3, depth=3, base_channels=4)


def _torch_forward_backward(torch_net, x, grad_logits):
    x_t = torch.from_numpy(x).requires_grad_(True)
    logits = torch_net(x_t)
    logits.backward(torch.from_numpy(grad_logits))
    return logits.detach().numpy(), x_t.grad.numpy()


@pytest.mark.parametrize("batch, threads", [(5, 2), (3, 3), (4, 8)])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_split_batch_matches_torch(rng, batch, threads, padding):
    net, torch_net = twin_networks(**SMALL, padding=padding, dtype="float64", seed=4)
    size = net.valid_input_size(28)
    x = rng.standard_normal((batch, 2, size, size))
    grad_logits = rng.standard_normal((batch, 3, *[net.output_size(size)] * 2))
    split = BatchSplit(net, threads=threads)
    for p in net.parameters():  # the shares' gradients add onto what is there
        p.grad[...] = 1.0
    logits, grad_x = split.forward(x), None
    assert split._shares is not None and len(split._shares) == min(batch, threads)
    grad_x = split.backward(grad_logits)
    logits_t, grad_x_t = _torch_forward_backward(torch_net, x, grad_logits)
    assert_close_to(logits, logits_t, 1e-8, what="logits")
    assert_close_to(grad_x, grad_x_t, 1e-8, what="grad wrt input")
    for p in net.parameters():
        p.grad -= 1.0
    assert_gradients_match(net, torch_net, 1e-8)


def test_split_batch_without_input_gradient_matches_torch(rng):
    net, torch_net = twin_networks(**SMALL, padding="same", dtype="float64", seed=6)
    size = net.valid_input_size(28)
    x = rng.standard_normal((4, 2, size, size))
    grad_logits = rng.standard_normal((4, 3, *[net.output_size(size)] * 2))
    split = BatchSplit(net, threads=2)
    split.forward(x)
    assert split.backward(grad_logits, input_gradient=False) is None
    torch_net(torch.from_numpy(x)).backward(torch.from_numpy(grad_logits))
    assert_gradients_match(net, torch_net, 1e-8)


def test_replicas_follow_weights_replaced_between_steps(rng):
    net, torch_net = twin_networks(**SMALL, padding="same", dtype="float64", seed=5)
    split = BatchSplit(net, threads=2)
    x = rng.standard_normal((2, 2, 16, 16))
    split.forward(x)
    split.backward(np.ones((2, 3, 16, 16)))
    for p, (_, p_t) in zip(net.parameters(), torch_net.named_parameters(), strict=True):
        p.data = p.data * 0.5  # a new array, as an optimizer that does not work in place
        with torch.no_grad():
            p_t.mul_(0.5)
    logits_t, _ = _torch_forward_backward(torch_net, x, np.zeros((2, 3, 16, 16)))
    assert_close_to(split.forward(x), logits_t, 1e-8, what="logits after the change")


def test_blas_threads_are_restored_also_after_an_error(rng):
    net = UNet(**SMALL, padding="same", dtype="float64", seed=0)
    split = BatchSplit(net, threads=2)
    before = blas.blas_threads()
    seen = []
    original = net.head.forward

    def failing_head(h):
        seen.append(blas.blas_threads())
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("a share failed")
        return original(h)

    net.head.forward = failing_head
    with pytest.raises(RuntimeError, match="a share failed"):
        split.forward(rng.standard_normal((2, 2, 16, 16)))
    assert seen == [1, 1] or not blas.direct_gemm_available()  # BLAS on one thread in each
    assert blas.blas_threads() == before


@pytest.mark.parametrize("config, train", [(dict(batch_norm=True), True),
                                           (dict(dropout=0.3), True)])
def test_batch_statistics_and_dropout_run_unsplit(rng, config, train):
    net = UNet(**SMALL, padding="same", dtype="float64", seed=2, **config).train(train)
    split = BatchSplit(net, threads=2)
    split.forward(rng.standard_normal((4, 2, 16, 16)))
    assert split._shares is None and split._replicas == []


def test_evaluation_mode_with_batch_norm_splits_and_matches_torch(rng):
    net, torch_net = twin_networks(**SMALL, padding="same", batch_norm=True, dtype="float64",
                                   seed=3)
    net.eval()
    torch_net.eval()
    x = rng.standard_normal((4, 2, 16, 16))
    split = BatchSplit(net, threads=2)
    logits = split.forward(x)
    assert split._shares is not None
    logits_t, _ = _torch_forward_backward(torch_net, x, np.zeros((4, 3, 16, 16)))
    assert_close_to(logits, logits_t, 1e-8, what="logits")


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(threads):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        BatchSplit(UNet(**SMALL, padding="same", seed=0), threads=threads)


def test_a_gradient_for_another_batch_is_refused(rng):
    split = BatchSplit(UNet(**SMALL, padding="same", dtype="float64", seed=0), threads=2)
    split.forward(rng.standard_normal((4, 2, 16, 16)))
    with pytest.raises(ValueError, match="grad_out must be an array for the 4 images"):
        split.backward(np.ones((3, 3, 16, 16)))
