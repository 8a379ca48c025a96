"""Real-data loaders, each on small files written here (plus the DSB image in stardist)."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from minunet.data import (
    as_image,
    as_labels,
    load_dsb2018_nuclei,
    load_folder,
    load_isbi2012,
    pair_image_masks,
    read_image,
)
from minunet.data import loaders as loaders_module


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def two_squares(value=255):
    mask = np.zeros((12, 16), np.uint8)
    mask[1:4, 1:4] = value
    mask[6:10, 8:14] = value
    return mask


def test_folder_with_images_and_masks_subfolders(tmp_path, rng):
    for stem, value in (("b", 255), ("a10", 1), ("a2", 255)):
        save_png(tmp_path / "images" / f"{stem}.png", rng.integers(0, 255, (12, 16), np.uint8))
        (tmp_path / "masks").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / "masks" / f"{stem}.tif", two_squares(value))
    data = load_folder(tmp_path)
    assert data.names == ["a2", "a10", "b"]  # natural order
    for image, labels in zip(data.images, data.labels, strict=True):
        assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
        assert labels.dtype == np.int32 and labels.max() == 2  # two squares, two instances
        np.testing.assert_array_equal(labels > 0, two_squares() > 0)


def test_folder_with_mask_suffix_and_instance_masks(tmp_path, rng):
    instances = np.zeros((8, 8), np.uint16)
    instances[0:3, 0:3], instances[3:6, 3:6], instances[6:8, 0:2] = 7, 3, 9
    save_png(tmp_path / "cell.png", rng.integers(0, 255, (8, 8, 3), np.uint8))
    tifffile.imwrite(tmp_path / "cell_mask.tif", instances)
    data = load_folder(tmp_path)
    assert data.images[0].shape == (3, 8, 8)  # RGB becomes channels-first
    np.testing.assert_array_equal(data.labels[0], instances)
    with pytest.raises(ValueError, match="binary"):
        load_folder(tmp_path, kind="binary")


def test_folder_errors(tmp_path, rng):
    save_png(tmp_path / "x.png", rng.integers(0, 255, (8, 8), np.uint8))
    with pytest.raises(ValueError, match="no mask for x.png"):
        pair_image_masks(tmp_path)
    save_png(tmp_path / "x_mask.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        pair_image_masks(tmp_path / "nowhere")


def test_mask_checks():
    with pytest.warns(UserWarning, match="no foreground"):
        as_labels(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="distinct values"):
        as_labels(np.arange(16).reshape(4, 4), kind="binary")
    with pytest.raises(ValueError, match="negative"):
        as_labels(-np.ones((4, 4), np.int16))
    with pytest.raises(ValueError, match="kind"):
        as_labels(np.ones((4, 4), np.uint8), kind="semantic")


def test_unreadable_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(path)


def isbi_like_mask(rng, shape=(16, 16)):
    """255 = cell interior, 0 = membranes on a random grid of lines."""
    mask = np.full(shape, 255, np.uint8)
    mask[rng.integers(2, 14), :] = 0
    mask[:, rng.integers(2, 14)] = 0
    return mask


def test_isbi_tiff_stacks(tmp_path, rng):
    volume = rng.integers(0, 255, (3, 16, 16), np.uint8)
    masks = np.stack([isbi_like_mask(rng) for _ in range(3)])
    tifffile.imwrite(tmp_path / "train-volume.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "train-labels.tif", masks, photometric="minisblack")
    data = load_isbi2012(tmp_path)
    assert len(data) == 3
    for labels, mask in zip(data.labels, masks, strict=True):
        np.testing.assert_array_equal(labels > 0, mask == 255)
        assert labels.max() == ndimage.label(mask == 255)[1] == 4  # two lines cut 4 cells


def test_isbi_png_export(tmp_path, rng):
    for i in (0, 1, 10, 2):
        image = rng.integers(0, 255, (16, 16), np.uint8)
        save_png(tmp_path / "train" / "image" / f"{i}.png", image)
        save_png(tmp_path / "train" / "label" / f"{i}.png", isbi_like_mask(rng))
    data = load_isbi2012(tmp_path)
    assert data.names == ["0", "1", "2", "10"]
    assert all(labels.max() == 4 for labels in data.labels)
    with pytest.raises(FileNotFoundError, match="train-volume.tif"):
        load_isbi2012(tmp_path / "train")


def test_dsb2018_nuclei_from_stardist():
    data = load_dsb2018_nuclei()
    image, labels = data[0]
    assert image.shape == labels.shape == (512, 512) and image.dtype == np.float32
    assert len(np.unique(labels)) - 1 == 125  # the 125 annotated nuclei
    assert image[labels > 0].mean() > image[labels == 0].mean()


def test_dsb2018_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(loaders_module.importlib.util, "find_spec",
                        lambda name: None if name == "stardist" else real_find_spec(name))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps stardist==0.9.2"):
        load_dsb2018_nuclei()


@pytest.mark.parametrize("value", [128, 7, 1, 255])
def test_a_two_valued_mask_is_binary_whatever_its_foreground_value(value, tmp_path, rng):
    """0/128 (or 0/7) masks used to be read as one "cell" with id 128: now they are binary,
    split into connected components, with a warning unless the value is 1 or 255."""
    expected, _ = ndimage.label(two_squares() > 0)
    if value in (1, 255):
        labels = as_labels(two_squares(value))
    else:
        with pytest.warns(UserWarning, match=f"0 and {value}.*binary"):
            labels = as_labels(two_squares(value))
    np.testing.assert_array_equal(labels, expected)
    save_png(tmp_path / "a.png", rng.integers(0, 255, (12, 16), np.uint8))
    save_png(tmp_path / "a_mask.png", two_squares(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(load_folder(tmp_path).labels[0], expected)


def test_masks_with_more_values_stay_instance_labels():
    mask = two_squares()
    mask[mask > 0] = 0
    mask[1:4, 1:4], mask[6:10, 8:14] = 3, 9
    np.testing.assert_array_equal(as_labels(mask), mask)


def test_nan_pixels_are_refused(rng):
    image = rng.random((8, 8)).astype(np.float32)
    image[2, 3] = np.nan
    with pytest.raises(ValueError, match="image has 1 NaN"):
        as_image(image)
