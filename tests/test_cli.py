"""The command line, through main([...]) and once through a real subprocess."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import minunet
from minunet.backend import gpu_available
from minunet.cli import build_parser, main

TINY = ["--image-size", "32", "--depth", "2", "--base-channels", "4", "--steps", "2",
        "--tile-size", "16", "--batch-size", "1", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    path = folder / "net.npz"
    assert main(["train", "--num-images", "2", "--out", str(path), *TINY]) == 0
    return path


@pytest.fixture
def image_file(tmp_path, rng):
    path = tmp_path / "cells.png"
    Image.fromarray(rng.integers(0, 255, (30, 41), np.uint8)).save(path)
    return path


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_train_writes_model_history_overlay_and_a_summary(model, capsys):
    assert model.is_file()
    history = json.loads(model.with_suffix(".history.json").read_text())
    assert len(history["loss"]) == 2 and history["config"]["depth"] == 2
    assert (model.parent / "net_overlay.png").is_file()
    assert minunet.load(model).config["base_channels"] == 4


def test_train_prints_the_summary_table(tmp_path, capsys):
    assert main(["train", "--num-images", "1", "--out", str(tmp_path / "m.npz"), *TINY]) == 0
    out = capsys.readouterr().out
    assert "val IoU" in out and "count err" in out


def test_predict_writes_probabilities_labels_and_overlay(model, image_file, tmp_path):
    out, labels, overlay = tmp_path / "p.npy", tmp_path / "l.tif", tmp_path / "o.png"
    assert main(["predict", str(image_file), "-o", str(out), "--model", str(model),
                 "--labels", str(labels), "--overlay", str(overlay), "--tile-size", "8",
                 "--quiet"]) == 0
    prob = np.load(out)
    assert prob.shape == (2, 30, 41) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(axis=0), 1, atol=1e-5)
    assert overlay.is_file() and labels.is_file()
    png = tmp_path / "p.png"
    assert main(["predict", str(image_file), "-o", str(png), "--model", str(model),
                 "--quiet"]) == 0
    assert np.asarray(Image.open(png)).shape == (30, 41)


def test_evaluate_and_count(model, image_file, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--model", str(model), "--num-images", "2", "--image-size", "40",
                 "--json", str(scores), "--quiet"]) == 0
    report = json.loads(scores.read_text())
    assert len(report["images"]) == 2 and 0 <= report["mean"]["iou"] <= 1
    assert "Rand err" in capsys.readouterr().out
    assert main(["count", str(image_file), str(image_file), "--model", str(model),
                 "--overlay-dir", str(tmp_path / "overlays"), "--quiet"]) == 0
    assert "cells" in capsys.readouterr().out
    assert (tmp_path / "overlays" / "cells_overlay.png").is_file()


def test_missing_and_unreadable_inputs_give_one_line(model, tmp_path, capsys):
    out = tmp_path / "p.npy"
    assert main(["predict", str(tmp_path / "nope.png"), "-o", str(out), "--model",
                 str(model)]) == 1
    one_line_error(capsys, "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["predict", str(broken), "-o", str(out), "--model", str(model)]) == 1
    one_line_error(capsys, "cannot read image")
    assert main(["predict", str(broken), "-o", str(out), "--model",
                 str(tmp_path / "none.npz")]) == 1
    one_line_error(capsys, "no model file")
    assert not out.exists()


def test_bad_checkpoint_never_replaces_an_existing_output(image_file, tmp_path, capsys):
    out = tmp_path / "p.npy"
    np.save(out, np.arange(3))
    two_channel = tmp_path / "rgb.npz"
    minunet.save(minunet.UNet(in_channels=2, depth=2, base_channels=2, seed=0), two_channel)
    assert main(["predict", str(image_file), "-o", str(out), "--model", str(two_channel)]) == 1
    one_line_error(capsys, "channels")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 nonsense")
    assert main(["predict", str(image_file), "-o", str(out), "--model", str(corrupt)]) == 1
    one_line_error(capsys, "corrupt.npz")
    np.testing.assert_array_equal(np.load(out), np.arange(3))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_resume_with_a_checkpoint_of_another_network(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt.npz"
    args = ["train", "--num-images", "1", "--out", str(tmp_path / "m.npz"),
            "--checkpoint", str(checkpoint), *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--base-channels", "6"]) == 1
    one_line_error(capsys, "config")


@pytest.mark.skipif(gpu_available(), reason="checks the message shown without a GPU")
def test_gpu_without_cupy_is_one_line(model, image_file, tmp_path, capsys):
    assert main(["predict", str(image_file), "-o", str(tmp_path / "p.npy"), "--model",
                 str(model), "--device", "gpu"]) == 1
    one_line_error(capsys, "CuPy")


def test_every_option_is_explained():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"train", "predict", "evaluate", "count"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name}: option {action.option_strings or action.dest} lacks help"


def test_subprocess_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minunet", "predict", "missing.png", "-o",
                             str(tmp_path / "x.npy")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    help_text = subprocess.run([sys.executable, "-m", "minunet", "train", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    assert "--tile-size" in help_text and "--device" in help_text
