"""Augmentation (elastic deformation, dihedral transforms, jitter) and training tiles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from minunet.data import (
    DIHEDRAL,
    TileSampler,
    apply_dihedral,
    augment,
    elastic_deform,
    elastic_displacement,
    extract_tile,
    gray_value_jitter,
    invert_dihedral,
    mirror_pad,
    synthetic_cell_image,
    warp,
)
from minunet.shapes import unet_input_size_for_output, unet_output_size


def test_elastic_identity_when_std_is_zero(rng):
    image = rng.random((2, 20, 24)).astype(np.float32)
    labels = rng.integers(0, 5, (20, 24)).astype(np.int32)
    weights = rng.random((20, 24)).astype(np.float32)
    out = elastic_deform(image, labels, weights, rng=rng, std=0.0)
    for before, after in zip((image, labels, weights), out, strict=True):
        np.testing.assert_allclose(after, before, atol=1e-6)
        assert after.dtype == before.dtype


def test_displacement_is_a_cubic_interpolation_of_the_coarse_grid():
    field = elastic_displacement((41, 61), np.random.default_rng(3), std=10.0, grid=3)
    coarse = np.random.default_rng(3).normal(0.0, 10.0, size=(2, 3, 3))
    # nodes sit at the corners and centre of the image
    for (gi, gj), (i, j) in {(0, 0): (0, 0), (1, 1): (20, 30), (2, 2): (40, 60),
                             (0, 2): (0, 60)}.items():
        np.testing.assert_allclose(field[:, i, j], coarse[:, gi, gj], atol=1e-9)
    assert np.abs(np.diff(field, axis=-1)).max() < 3.0  # smooth: no jumps between neighbours


def test_labels_stay_valid_and_deformation_matches_image(rng):
    _, labels = synthetic_cell_image(64, seed=2)
    displacement = elastic_displacement(labels.shape, rng, std=10.0)
    warped_labels = warp(labels, displacement, order=0)
    assert warped_labels.dtype == labels.dtype
    assert set(np.unique(warped_labels)) <= set(np.unique(labels))
    # the label image pushed through the image path (order 1) agrees with the label path
    # wherever the four neighbours of the sample point carry the same label
    as_image = warp(labels.astype(np.float64), displacement, order=1)
    uniform = ndimage.minimum_filter(labels, 3) == ndimage.maximum_filter(labels, 3)
    uniform_warped = warp(uniform.astype(np.uint8), displacement, order=0).astype(bool)
    np.testing.assert_allclose(as_image[uniform_warped], warped_labels[uniform_warped], atol=1e-6)
    # and it really moved something
    assert (warped_labels != labels).mean() > 0.01


def test_elastic_deform_applies_one_warp_to_all_arrays(rng):
    _, labels = synthetic_cell_image(48, seed=4)
    image = labels.astype(np.float32)
    out_image, out_labels, out_weights = elastic_deform(
        image, labels, image.copy(), rng=np.random.default_rng(5), std=8.0, image_order=0)
    np.testing.assert_array_equal(out_image, out_labels.astype(np.float32))
    assert out_weights.shape == labels.shape


@pytest.mark.parametrize(("k", "flip"), DIHEDRAL)
def test_dihedral_inverse(rng, k, flip):
    x = rng.random((2, 5, 7))
    y = apply_dihedral(x, k, flip)
    np.testing.assert_array_equal(invert_dihedral(y, k, flip), x)


def test_dihedral_group_has_eight_distinct_elements(rng):
    x = rng.random((4, 4))
    images = {apply_dihedral(x, k, flip).tobytes() for k, flip in DIHEDRAL}
    assert len(images) == 8


def test_jitter_keeps_range_and_dtype(rng):
    image = rng.random((16, 16)).astype(np.float32)
    out = gray_value_jitter(image, rng)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, image)


def test_augment_is_seeded_and_does_not_mutate():
    image, labels = synthetic_cell_image(40, seed=1)
    before = image.copy(), labels.copy()
    a = augment(image, labels, rng=np.random.default_rng(9))
    b = augment(image, labels, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] is None
    np.testing.assert_array_equal(image, before[0])
    np.testing.assert_array_equal(labels, before[1])


def test_mirror_pad_reflects_about_the_border_pixel():
    row = np.array([[1, 2, 3, 4]])
    out = mirror_pad(np.repeat(row, 3, axis=0), ((0, 0), (2, 2)))
    np.testing.assert_array_equal(out[0], [3, 2, 1, 2, 3, 4, 3, 2])


def test_extract_tile_equals_crop_of_padded_image(rng):
    image = rng.random((3, 10, 13))
    padded = mirror_pad(image, 4)
    for top, left in [(0, 0), (6, 9), (3, 5)]:
        tile = extract_tile(image, top, left, size=4, margin=4)
        np.testing.assert_array_equal(tile, padded[:, top:top + 12, left:left + 12])


def test_tile_sampler_shapes_and_alignment():
    depth, out = 3, 20
    n_in = unet_input_size_for_output(out, depth)
    n_out = unet_output_size(n_in, depth)
    image, labels = synthetic_cell_image((50, 60), seed=0)
    # the target is the image itself: an unaugmented tile's target must be the centre crop
    target = (image * 1000).astype(np.int64)
    sampler = TileSampler([image], [target], input_size=n_in, output_size=n_out,
                          augment_tiles=False)
    x, t, w = sampler.sample(3, np.random.default_rng(0))
    assert x.shape == (3, 1, n_in, n_in) and x.dtype == np.float32
    assert t.shape == w.shape == (3, n_out, n_out)
    margin = (n_in - n_out) // 2
    np.testing.assert_array_equal(t, (x[:, 0, margin:margin + n_out, margin:margin + n_out]
                                      * 1000).astype(np.int64))
    np.testing.assert_array_equal(w, 1.0)
    for padding in ("valid", "same"):
        fitted = TileSampler.for_unet([image], [target], output_size=out, depth=depth,
                                      padding=padding)
        assert unet_output_size(fitted.input_size, depth, padding=padding) == fitted.output_size
        assert fitted.output_size >= out


def test_tile_sampler_augmented_labels_stay_labels():
    image, labels = synthetic_cell_image(64, seed=0)
    sampler = TileSampler([image], [labels > 0], [np.full(labels.shape, 2.0)], input_size=44,
                          output_size=28)
    x, t, w = sampler.sample(2, np.random.default_rng(1))
    assert set(np.unique(t)) <= {0, 1}
    np.testing.assert_allclose(w, 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="centred"):
        TileSampler([image], [labels], input_size=44, output_size=27)
    with pytest.raises(ValueError, match="image 0"):
        TileSampler([image], [labels[:10]], input_size=44, output_size=28)
