"""Pretrained models: the registry, loading at half precision, and the command line."""

import json

import numpy as np
import pytest

import minunet
from minunet import zoo
from minunet.cli import main as cli_main


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A models folder holding one small network stored at half precision, with its card."""
    net = minunet.UNet(depth=2, base_channels=4, padding="same", batch_norm=True, seed=3)
    minunet.save(net, tmp_path / "cells.npz", storage_dtype="float16")
    (tmp_path / "cells.json").write_text(json.dumps({"name": "cells", "scores": {"f1": 0.5}}))
    (tmp_path / "orphan.npz").write_bytes((tmp_path / "cells.npz").read_bytes())  # no card
    monkeypatch.setattr(zoo, "MODELS", tmp_path)
    return net


def test_registry_lists_models_with_a_card(models):
    assert minunet.list_pretrained() == ["cells"]
    assert minunet.model_card("cells")["scores"] == {"f1": 0.5}
    with pytest.raises(ValueError, match="unknown pretrained model 'nope'; available: cells"):
        minunet.pretrained("nope")


def test_half_precision_storage_rounds_the_weights_only(models):
    net = minunet.pretrained("cells")
    assert not net.training and net.dtype == np.float32
    for name, value in models.state_dict().items():
        loaded = net.state_dict()[name]
        expected = value.astype(np.float16).astype(value.dtype) if value.dtype.kind == "f" \
            else value
        np.testing.assert_array_equal(loaded, expected, err_msg=name)


def test_cli_accepts_a_pretrained_name(models, tmp_path, capsys):
    from PIL import Image

    image = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "cells.png")
    assert cli_main(["count", str(tmp_path / "cells.png"), "--model", "cells", "--quiet"]) == 0
    assert cli_main(["count", str(tmp_path / "cells.png"), "--model", "nope", "--quiet"]) != 0
    assert "no pretrained model of that name (pretrained: cells" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["dsb2018", "isbi2012"])
def test_shipped_model_equals_the_same_weights_in_pytorch(name):
    """Each shipped file loads into a network that computes what PyTorch computes with its
    weights, and predicts a 512x512 image with no other argument."""
    import torch

    from minunet.serialization import to_torch_state_dict
    from minunet.torch_reference import TorchUNet

    if name not in minunet.list_pretrained():
        pytest.fail(f"the pretrained model {name} is not shipped")
    net = minunet.pretrained(name)
    card = minunet.model_card(name)
    assert card["network"] == net.config and card["scores"]
    config = {k: v for k, v in net.config.items() if k not in ("dtype", "seed")}
    reference = TorchUNet(**config).double().eval()
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v
                               for k, v in to_torch_state_dict(net).items()})
    x = np.random.default_rng(0).random((1, 1, 96, 96))
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net(x.astype(np.float32)), expected, rtol=1e-3, atol=1e-3)
    prob = minunet.predict(net, np.random.default_rng(1).random((512, 512)))
    assert prob.shape == (2, 512, 512)
    np.testing.assert_allclose(prob.sum(axis=0), 1, atol=1e-5)


def test_cli_uses_the_cards_smallest_cell(models, monkeypatch):
    import argparse

    from minunet.cli import min_cell_size

    card = {"name": "cells", "scores": {}, "postprocess": {"min_size": 24}}
    (zoo.MODELS / "cells.json").write_text(json.dumps(card))
    args = argparse.Namespace(model="cells", min_size=None)
    assert min_cell_size(args) == 24
    assert min_cell_size(argparse.Namespace(model="cells", min_size=5)) == 5
