"""Whole-slide prediction and counting on Dask (minunet.slides) against the in-memory path.

Oracles: ``minunet.predict`` on the whole image (itself tested against PyTorch), SciPy's
``ndimage.label``/``center_of_mass`` on the drawn cells, ``minunet.count_cells``.
"""

from __future__ import annotations

import csv
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage

import minunet
from minunet import slides
from minunet.data import as_image


@pytest.fixture(scope="module")
def valid_net():
    return minunet.UNet(depth=3, base_channels=2, padding="valid", batch_norm=False, seed=3)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((102, 131)).astype(np.float32)


def as_source(kind, array, tmp_path):
    if kind == "numpy":
        return array
    if kind == "dask":  # chunks unrelated to the slide's chunking
        return da.from_array(array, chunks=(37, 51))
    if kind == "zarr":
        store = zarr.create_array(store=str(tmp_path / "s.zarr"), shape=array.shape,
                                  dtype=array.dtype, chunks=(32, 32))
        store[...] = array
        return store
    path = tmp_path / "s.tif"
    if kind == "tiff":
        tifffile.imwrite(path, array, tile=(32, 32))
    else:  # a pyramidal BigTIFF: level 0 must be read, not the half-size level
        with tifffile.TiffWriter(path, bigtiff=True) as tiff:
            tiff.write(array, tile=(32, 32), subifds=1)
            tiff.write(array[::2, ::2], tile=(32, 32), subfiletype=1)
    return str(path)


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr", "tiff", "pyramid"])
@pytest.mark.parametrize("chunk_size", [32, 60, 512])
def test_valid_network_matches_whole_image(valid_net, image, kind, chunk_size, tmp_path):
    # 102 x 131 is divided by none of the chunk sizes; 512 is larger than the image
    expected = minunet.predict(valid_net, image)
    got = slides.predict(valid_net, as_source(kind, image, tmp_path), chunk_size=chunk_size,
                         tile_size=40)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got.compute(), expected, rtol=0, atol=1e-6)


def test_same_network_within_documented_tolerance(image):
    # depth 4: the receptive field (> 2 x 32 px) outgrows the margin, so chunks do differ
    net = minunet.UNet(depth=4, base_channels=2, padding="same", batch_norm=False, seed=4)
    expected = minunet.predict(net, image)
    for chunk_size in (48, 80):
        got = slides.predict(net, image, chunk_size=chunk_size).compute()
        assert np.abs(got - expected).max() < slides.SAME_PADDING_TOLERANCE


def test_integer_slide_is_scaled_like_as_image(valid_net, tmp_path):
    raw = np.random.default_rng(1).gamma(2.0, 300.0, (90, 70)).astype(np.uint16)
    expected = minunet.predict(valid_net, as_image(raw))
    got = slides.predict(valid_net, as_source("tiff", raw, tmp_path), chunk_size=32)
    np.testing.assert_allclose(got.compute(), expected, rtol=0, atol=1e-5)


class RecordingArray:
    """An array-like that records the largest region read from it."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, 2
        self.largest = 0

    def __getitem__(self, region):
        block = self.array[region]
        self.largest = max(self.largest, block.size)
        return block


def test_slide_is_read_chunk_by_chunk_and_network_built_once(image, monkeypatch):
    net = minunet.UNet(depth=3, base_channels=2, padding="valid", batch_norm=False, seed=11)
    builds = []
    original = minunet.UNet.load_state_dict
    monkeypatch.setattr(minunet.UNet, "load_state_dict",
                        lambda self, state: builds.append(1) or original(self, state))
    recording = RecordingArray(image)
    portable = slides.PortableNetwork(net)  # weights no other test built before
    assert len(pickle.dumps(portable)) < 2 * sum(v.nbytes for v in portable.state.values())
    with dask.config.set(scheduler="synchronous"):
        got = slides.predict(portable, recording, chunk_size=32).compute()
    np.testing.assert_allclose(got, minunet.predict(net, image), rtol=0, atol=1e-6)
    assert recording.largest <= 32 * 32  # chunks are read, never the whole slide
    assert len(builds) == 1  # one thread: one network for all 20 chunks


def draw_disks(shape, centers, radius):
    truth = np.zeros(shape, np.int32)
    rows, cols = np.indices(shape)
    for label, (r, c) in enumerate(centers, 1):
        truth[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = label
    return truth


def test_cells_on_chunk_borders_and_corners_are_counted_once():
    chunk = 48
    # on corners, across horizontal and vertical borders, at the slide's border, inside
    centers = [(48, 48), (96, 96), (47.5, 96), (48, 20), (100, 47), (20, 143), (140, 100),
               (0, 60), (5, 5), (143, 143), (72, 72), (120, 20), (24, 120)]
    truth = draw_disks((144, 150), centers, 6)
    prob = np.stack([(truth == 0), (truth > 0)]).astype(np.float32)
    result = slides.count_cells(da.from_array(prob, chunks=(2, 37, 41)), chunk_size=chunk,
                                cell_size=16)
    labels = np.arange(1, len(centers) + 1)
    expected = np.array(ndimage.center_of_mass(truth > 0, truth, labels))
    expected = expected[np.lexsort((expected[:, 1], expected[:, 0]))]
    assert result.count == len(centers) == minunet.count_cells(prob).count
    np.testing.assert_allclose(result.centroids, expected, atol=1e-9)
    np.testing.assert_array_equal(np.sort(result.areas),
                                  np.sort(np.bincount(truth.ravel())[1:]))


def test_touching_cells_split_as_in_memory():
    # pairs of touching cells whose neck lies on a chunk border or corner
    centers = [(40, 33), (40, 47), (33, 80), (47, 80), (75, 75), (85, 85), (100, 20)]
    truth = draw_disks((110, 100), centers, 8)
    fg = ndimage.gaussian_filter((truth > 0).astype(np.float32), 1.5)
    expected = minunet.count_cells(fg)
    result = slides.count_cells(fg, chunk_size=40, cell_size=40)
    assert result.count == expected.count == len(centers)
    in_memory = np.array(ndimage.center_of_mass(expected.labels > 0, expected.labels,
                                                np.arange(1, expected.count + 1)))
    in_memory = in_memory[np.lexsort((in_memory[:, 1], in_memory[:, 0]))]
    np.testing.assert_allclose(result.centroids, in_memory, atol=1e-9)


def test_cell_larger_than_the_halo_is_reported():
    truth = draw_disks((96, 96), [(48, 48)], 30)
    with pytest.warns(UserWarning, match="cell_size"):
        slides.count_cells(truth > 0, chunk_size=32, cell_size=8, separate=False)


def test_local_cluster_of_processes_equals_local(valid_net, image, model_file, tmp_path,
                                                 monkeypatch):
    distributed = pytest.importorskip("distributed")
    from minunet.cli import main

    local = slides.predict(valid_net, image, chunk_size=64).compute()
    monkeypatch.chdir(tmp_path)
    tifffile.imwrite("slide.tif", image, tile=(32, 32))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            remote = slides.predict(valid_net, image, chunk_size=64).compute()
            counted = slides.count_cells(image > 0.95, chunk_size=64, separate=False)
        assert main(["count", "slide.tif", "--chunk-size", "64", "--model", str(model_file),
                     "--scheduler", cluster.scheduler_address, "--quiet"]) == 0
    np.testing.assert_array_equal(remote, local)
    assert counted.count == slides.count_cells(image > 0.95, chunk_size=64,
                                               separate=False).count
    stored = zarr.open_array("slide_probabilities.zarr", mode="r")[...]
    np.testing.assert_allclose(stored.astype(np.float32), local, atol=1e-3)


@pytest.fixture(scope="module")
def model_file(valid_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "net.npz"
    minunet.save(valid_net, path)
    return path


def test_cli_count_on_a_tiled_tiff(model_file, tmp_path, monkeypatch, capsys):
    from minunet.cli import main

    monkeypatch.chdir(tmp_path)
    centers = [(30, 30), (30, 64), (64, 64), (100, 20), (110, 110)]
    raw = (draw_disks((130, 140), centers, 7) > 0).astype(np.uint8) * 200 + 20
    tifffile.imwrite("slide.tif", raw, tile=(32, 32))
    assert main(["count", "slide.tif", "--chunk-size", "64", "--model", str(model_file),
                 "--zarr", "p.zarr", "--csv", "cells.csv", "--overlay-dir", "over"]) == 0
    output = capsys.readouterr()
    stored = zarr.open_array(str(tmp_path / "p.zarr"), mode="r")
    expected = slides.predict(minunet.load(model_file), raw, chunk_size=64).compute()
    np.testing.assert_allclose(stored[...].astype(np.float32), expected, atol=1e-3)
    found = slides.count_cells(stored[...].astype(np.float32), chunk_size=64)
    with open(tmp_path / "cells.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == found.count and f"{found.count} cells" in output.out
    assert "predicting" in output.err and "counting" in output.err  # progress over chunks
    np.testing.assert_allclose([[float(r["row"]), float(r["col"])] for r in rows],
                               found.centroids, atol=1e-3)
    assert (tmp_path / "over" / "slide_overlay.png").stat().st_size > 0


@pytest.mark.parametrize("case", ["missing", "stack", "small-chunk", "scheduler"])
def test_cli_bad_input_is_one_line(model_file, tmp_path, case, capsys, monkeypatch):
    from minunet.cli import main

    monkeypatch.chdir(tmp_path)
    tifffile.imwrite("stack.tif", np.zeros((4, 64, 64), np.uint8), photometric="minisblack")
    tifffile.imwrite("ok.tif", np.zeros((64, 64), np.uint8))
    slide, extra, needle = {
        "missing": ("nothing.tif", [], "no such file"),
        "stack": ("stack.tif", [], "stack of 4"),
        "small-chunk": ("ok.tif", ["--chunk-size", "8"], "chunk_size 8 is smaller"),
        "scheduler": ("ok.tif", ["--scheduler", "tcp://127.0.0.1:9"], "no Dask scheduler"),
    }[case]
    args = extra if "--chunk-size" in extra else ["--chunk-size", "64", *extra]
    assert main(["predict", slide, "-o", "p.zarr", "--model", str(model_file), *args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
