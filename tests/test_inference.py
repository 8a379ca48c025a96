"""Tiled prediction (overlap-tile with mirroring), test-time augmentation, eval mode."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from minunet.data import DIHEDRAL, apply_dihedral, invert_dihedral
from minunet.inference import DEFAULT_TILE_SIZE, count_cells, predict
from minunet.unet import UNet


@pytest.fixture
def valid_net():
    return UNet(in_channels=2, depth=3, base_channels=4, seed=1)


@pytest.fixture
def image(rng):
    return rng.random((2, 37, 45)).astype(np.float32)  # non-square, sizes no U-Net accepts


@pytest.mark.parametrize("tile_size", [4, 9, 16, 30, 64])
def test_valid_net_result_does_not_depend_on_tile_size(valid_net, image, tile_size):
    whole = predict(valid_net, image)
    tiled = predict(valid_net, image, tile_size=tile_size)
    assert whole.shape == (2, 37, 45) and whole.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, atol=2e-6)
    np.testing.assert_allclose(whole.sum(axis=0), 1.0, atol=1e-5)  # probabilities


def test_tile_offsets_matter_so_the_stride_rule_is_needed(valid_net, image):
    """Negative control: shifting the image by one pixel changes the max-pool grid, so the
    network's output is not simply shifted. (Tiles that advanced by odd amounts would show
    seams; the test above passes only because tiles advance by multiples of 4.)"""
    whole = predict(valid_net, image)
    shifted = predict(valid_net, image[:, :, 1:])
    assert np.abs(shifted[:, 8:-8, 8:-8] - whole[:, 8:-8, 9:-8]).max() > 1e-4


def test_same_net_tiles_with_margin_are_close(rng):
    net = UNet(depth=3, base_channels=4, padding="same", batch_norm=True, seed=2)
    image = rng.random((41, 50)).astype(np.float32)
    whole = predict(net, image)
    for tile_size in (8, 24):
        np.testing.assert_allclose(predict(net, image, tile_size=tile_size), whole, atol=1e-4)
    # without a margin the zero padding at the tile borders shows
    assert np.abs(predict(net, image, tile_size=8, margin=0) - whole).max() > 1e-3


def test_tta_averages_the_eight_symmetries(valid_net, image):
    expected = np.mean([invert_dihedral(predict(valid_net, apply_dihedral(image, k, flip)),
                                        k, flip) for k, flip in DIHEDRAL], axis=0)
    np.testing.assert_allclose(predict(valid_net, image, tta=True), expected, atol=1e-6)


def test_predict_runs_in_eval_mode_and_restores_the_mode(rng):
    net = UNet(depth=2, base_channels=4, batch_norm=True, dropout=0.5, seed=3)
    image = rng.random((20, 20)).astype(np.float32)
    net.train()
    first = predict(net, image)
    assert net.training
    np.testing.assert_array_equal(predict(net, image), first)  # no dropout noise: eval mode
    net.eval()
    predict(net, image)
    assert not net.training


def test_predict_input_errors(valid_net, image):
    with pytest.raises(ValueError, match="image must be"):
        predict(valid_net, image[0])  # one channel for a two-channel network
    with pytest.raises(ValueError, match="tile_size"):
        predict(valid_net, image, tile_size=0)
    with pytest.raises(ValueError, match="too small"):
        predict(UNet(depth=4, base_channels=2, padding="same", seed=0), image[0], tile_size=4,
                 margin=5)  # 16-pixel input tiles keep 6 pixels, less than the 8 needed
    with pytest.raises(TypeError, match="floating point"):
        predict(valid_net, (image * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="margin"):
        predict(valid_net, image, margin=3)


@pytest.mark.gpu
def test_predict_on_the_gpu_matches_the_cpu(valid_net, image):
    expected = predict(valid_net, image, tile_size=16)
    valid_net.to("cupy")
    got = predict(valid_net, image, tile_size=16)
    assert isinstance(got, np.ndarray)  # probabilities come back to the host
    np.testing.assert_allclose(got, expected, atol=1e-4)


# --- Defaults that keep memory bounded, and inputs that used to hang ------------------------


def test_default_prediction_is_tiled_and_equals_one_pass(rng, monkeypatch):
    """By default an image larger than DEFAULT_TILE_SIZE is predicted tile by tile, each
    forward pass no larger than one tile plus its context, with the result of one pass."""
    net = UNet(depth=2, base_channels=2, dtype="float64", seed=3)
    image = rng.random((DEFAULT_TILE_SIZE + 60, 50))
    shapes = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: shapes.append(x.shape) or forward(x))
    tiled = predict(net, image)
    assert len(shapes) >= 2
    assert max(shape[2] for shape in shapes) <= net.input_size_for_output(DEFAULT_TILE_SIZE)
    whole = predict(net, image, tile_size=None)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-12)


def test_default_prediction_memory_does_not_grow_with_the_image(rng):
    net = UNet(depth=2, base_channels=2, seed=3)
    image = rng.random((2 * DEFAULT_TILE_SIZE + 100, 2 * DEFAULT_TILE_SIZE + 100),
                       dtype=np.float32)

    def peak_bytes(**kwargs):
        tracemalloc.start()
        try:
            predict(net, image, **kwargs)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak_bytes() < 0.5 * peak_bytes(tile_size=None)


def test_an_image_with_nan_is_refused_instead_of_hanging(valid_net, image, time_limit):
    image = image.copy()
    image[1, 5, 7] = np.nan
    with time_limit(60), pytest.raises(ValueError, match="1 NaN"):
        predict(valid_net, image)
    with time_limit(60), pytest.raises(ValueError, match="NaN"):
        count_cells(image, valid_net)


def test_a_network_with_nan_weights_is_refused_instead_of_hanging(valid_net, image,
                                                                  time_limit):
    valid_net.head.weight.data[0, 0, 0, 0] = np.nan
    with time_limit(60), pytest.raises(FloatingPointError, match="weights"):
        count_cells(image, valid_net)
