"""Checkpoints: bit-exact round trips, atomic writes, clear errors; PyTorch conversion."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

import minunet
from minunet import UNet
from minunet.serialization import from_torch_state_dict, to_torch_state_dict
from minunet.torch_reference import TorchUNet

CONFIG = dict(in_channels=1, num_classes=3, depth=3, base_channels=4, batch_norm=True,
              dropout=0.2, seed=21)


@pytest.fixture
def trained_net(rng):
    """A network whose BatchNorm buffers moved away from their initial values."""
    net = UNet(**CONFIG)
    net.forward(rng.standard_normal((2, 1, 44, 44)).astype(np.float32))
    for p in net.parameters():
        p.data += rng.standard_normal(p.shape).astype(p.data.dtype)
    return net.eval()


def test_save_load_round_trip_is_bit_exact(tmp_path, rng, trained_net):
    path = tmp_path / "net.npz"
    minunet.save(trained_net, path)
    loaded = minunet.load(path).eval()
    assert loaded.config == trained_net.config
    for (name, a), (_, b) in zip(trained_net.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=name)
    x = rng.standard_normal((1, 1, 44, 44)).astype(np.float32)
    np.testing.assert_array_equal(trained_net.forward(x), loaded.forward(x))
    assert [p.name for p in tmp_path.iterdir()] == ["net.npz"]  # no temporary file left


def test_save_overwrites_atomically_and_keeps_the_name(tmp_path, trained_net):
    path = tmp_path / "checkpoint"  # no .npz suffix: the name is kept as given
    minunet.save(UNet(**CONFIG), path)
    minunet.save(trained_net, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    np.testing.assert_array_equal(minunet.load(path).head.weight.data,
                                  trained_net.head.weight.data)


def test_checkpoint_is_plain_npz_with_json_config(tmp_path, trained_net):
    path = tmp_path / "net.npz"
    minunet.save(trained_net, path)
    with np.load(path, allow_pickle=False) as archive:
        assert json.loads(str(archive["__config__"])) == trained_net.config
        assert "encoder.0.bn1.running_var" in archive.files


def _rewrite(path, drop=(), replace=None):
    """Copy the checkpoint at ``path`` without the entries in ``drop``, with ``replace``."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files if k not in drop}
    arrays.update(replace or {})
    np.savez(path, **arrays)


def test_broken_checkpoints_raise_value_errors(tmp_path, trained_net):
    path = tmp_path / "net.npz"

    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable minunet checkpoint"):
        minunet.load(path)

    minunet.save(trained_net, path)
    path.write_bytes(path.read_bytes()[:500])  # truncated
    with pytest.raises(ValueError, match="not a readable"):
        minunet.load(path)

    np.savez(path, weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a minunet checkpoint"):
        minunet.load(path)

    minunet.save(trained_net, path)
    _rewrite(path, drop=["head.bias"])
    with pytest.raises(ValueError, match="missing keys.*head.bias"):
        minunet.load(path)

    minunet.save(trained_net, path)
    _rewrite(path, replace={"__config__": np.array(json.dumps({**CONFIG, "base_channels": 8}))})
    with pytest.raises(ValueError, match="shape"):
        minunet.load(path)

    minunet.save(trained_net, path)
    _rewrite(path, replace={"__config__": np.array("{not json")})
    with pytest.raises(ValueError, match="configuration"):
        minunet.load(path)

    minunet.save(trained_net, path)
    with zipfile.ZipFile(path, "a") as archive:  # an object array would need pickle
        with archive.open("evil.npy", "w") as stream:
            np.lib.format.write_array(stream, np.array([{"a": 1}], dtype=object),
                                      allow_pickle=True)
    with pytest.raises(ValueError):
        minunet.load(path)

    with pytest.raises(FileNotFoundError):
        minunet.load(tmp_path / "missing.npz")


def test_torch_state_dict_conversion_round_trips(rng, trained_net):
    state = to_torch_state_dict(trained_net)
    torch_net = TorchUNet(**{k: v for k, v in CONFIG.items() if k != "seed"}).eval()
    torch_net.load_state_dict(state)  # strict: the key sets are identical
    x = rng.standard_normal((1, 1, 44, 44)).astype(np.float32)
    expected = torch_net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(trained_net.forward(x), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
    back = from_torch_state_dict(torch_net.state_dict(), **CONFIG).eval()
    for name, value in trained_net.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value, err_msg=name)
    state["head.weight"] += 1  # the conversion copies: the network is untouched
    assert not np.array_equal(state["head.weight"].numpy(), trained_net.head.weight.data)
