"""Optimisers against torch.optim: single tensors, then 20 training steps of a U-Net."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from _unet_oracle import assert_close_to, scale_of, twin_networks

from minunet import losses, optim
from minunet.functional import threads
from minunet.nn import Parameter

OPTIMIZERS = {
    "sgd": (optim.SGD, torch.optim.SGD, dict(lr=0.01, momentum=0.99)),
    "sgd_decay": (optim.SGD, torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
    "sgd_plain": (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.0)),
    "adam": (optim.Adam, torch.optim.Adam, dict(lr=0.01)),
    "adam_decay": (optim.Adam, torch.optim.Adam,
                   dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_rule_matches_torch_for_given_gradients(rng, name):
    ours_cls, torch_cls, kwargs = OPTIMIZERS[name]
    start = rng.standard_normal((3, 4))
    param = Parameter(start.copy())
    param_t = torch.nn.Parameter(torch.from_numpy(start.copy()))
    ours, theirs = ours_cls([param], **kwargs), torch_cls([param_t], **kwargs)
    for _ in range(15):
        grad = rng.standard_normal(start.shape)
        ours.zero_grad()
        param.grad += grad
        param_t.grad = torch.from_numpy(grad)
        ours.step()
        theirs.step()
        np.testing.assert_allclose(param.data, param_t.detach().numpy(), rtol=1e-12, atol=1e-14)


def _torch_loss(logits, target, weight):
    per_pixel = TF.cross_entropy(logits, torch.from_numpy(target), reduction="none")
    return (per_pixel * torch.from_numpy(weight)).mean()


@pytest.mark.parametrize("shares", [1, 3], ids=["one thread", "three shares"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_twenty_unet_training_steps_match_torch(rng, name, shares, monkeypatch):
    """Same initial weights, same batch, 20 steps: equal loss curves and final weights
    (with three shares, the parameters are updated and zeroed in three runs at once)."""
    monkeypatch.setattr(threads, "blas_threads", lambda: shares)
    monkeypatch.setattr(threads, "ELEMENTWISE_MIN_SIZE", 1)
    ours_cls, torch_cls, kwargs = OPTIMIZERS[name]
    net, torch_net = twin_networks(in_channels=1, num_classes=2, depth=3, base_channels=4,
                                   batch_norm=True, dtype="float64", seed=13)
    x = rng.standard_normal((2, 1, 44, 44))
    target = rng.integers(0, 2, size=(2, 4, 4))
    weight = rng.uniform(0.5, 3.0, size=(2, 4, 4))
    kwargs = dict(kwargs, lr=1e-3)
    ours, theirs = ours_cls(net.parameters(), **kwargs), torch_cls(torch_net.parameters(),
                                                                   **kwargs)
    curve, torch_curve = [], []
    for _ in range(20):
        ours.zero_grad()
        loss, grad_logits = losses.softmax_cross_entropy(net.forward(x), target, weight)
        net.backward(grad_logits)
        ours.step()
        curve.append(float(loss))

        theirs.zero_grad()
        torch_loss = _torch_loss(torch_net(torch.from_numpy(x)), target, weight)
        torch_loss.backward()
        theirs.step()
        torch_curve.append(torch_loss.item())
    np.testing.assert_allclose(curve, torch_curve, rtol=1e-9)
    assert curve[-1] < curve[0]  # it trains
    torch_state = {key: value.numpy() for key, value in torch_net.state_dict().items()}
    for key, value in net.state_dict().items():
        assert_close_to(value, torch_state[key], 1e-8, scale_of(net, key, torch_state),
                        what=key)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_resuming_from_state_dict_equals_an_uninterrupted_run(rng, name):
    ours_cls, _, kwargs = OPTIMIZERS[name]
    start = rng.standard_normal(5)
    grads = rng.standard_normal((12, 5))

    def run(steps, optimizer, param):
        for grad in grads[steps]:
            optimizer.zero_grad()
            param.grad += grad
            optimizer.step()

    straight = Parameter(start.copy())
    run(slice(0, 12), ours_cls([straight], **kwargs), straight)

    resumed = Parameter(start.copy())
    first = ours_cls([resumed], **kwargs)
    run(slice(0, 6), first, resumed)
    saved = first.state_dict()
    second = ours_cls([resumed], lr=123.0)  # wrong hyper-parameters, restored by loading
    second.load_state_dict(saved)
    run(slice(6, 12), second, resumed)
    np.testing.assert_array_equal(resumed.data, straight.data)


def test_state_dict_is_npz_friendly(tmp_path, rng):
    param = Parameter(rng.standard_normal(3))
    adam = optim.Adam([param], lr=0.1)
    param.grad += 1.0
    adam.step()
    np.savez(tmp_path / "opt.npz", **adam.state_dict())
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as archive:
        restored = {k: archive[k] for k in archive.files}
    other = optim.Adam([Parameter(param.data.copy())])
    other.load_state_dict(restored)
    assert other.step_count == 1 and other.betas == adam.betas and other.lr == 0.1
    np.testing.assert_array_equal(other.state["exp_avg"][0], adam.state["exp_avg"][0])


def test_load_state_dict_rejects_mismatches(rng):
    sgd = optim.SGD([Parameter(np.zeros(3))], lr=0.1)
    sgd.params[0].grad += 1
    sgd.step()
    state = sgd.state_dict()
    with pytest.raises(ValueError, match="shape"):
        optim.SGD([Parameter(np.zeros(4))], lr=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="unexpected"):
        optim.SGD([Parameter(np.zeros(3))], lr=0.1).load_state_dict(
            {**state, "momentum_buffer.7": np.zeros(3)})
    with pytest.raises(ValueError, match="missing"):
        optim.SGD([Parameter(np.zeros(3))], lr=0.1).load_state_dict({"lr": 0.1})


@pytest.mark.parametrize(
    "make, match",
    [(lambda p: optim.SGD(p, lr=0), "lr"), (lambda p: optim.SGD(p, lr=1, momentum=1.0), "momentum"),
     (lambda p: optim.Adam(p, betas=(0.9,)), "betas"), (lambda p: optim.Adam(p, eps=0), "eps"),
     (lambda p: optim.SGD(p, lr=1, weight_decay=-1), "weight_decay"),
     (lambda p: optim.SGD([], lr=1), "empty"),
     (lambda p: optim.SGD([np.zeros(2)], lr=1), "Parameter")],
)
def test_invalid_arguments_raise(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make([Parameter(np.zeros(2))])
