"""The command line, through main([...]) and once through a real subprocess."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import minunet
import minunet.inference
import minunet.train
import minunet.unet
from minunet.backend import gpu_available
from minunet.cli import build_parser, load_data, main
from minunet.inference import DEFAULT_TILE_SIZE

ROOT = Path(__file__).resolve().parent.parent

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


# --- Inputs and outputs a new user tries -----------------------------------------------------


def run_cli(*args, timeout=180, limit_memory=None):
    """``python -m minunet ARGS`` in a subprocess (optionally under ``ulimit -v``, with one
    BLAS thread, whose buffers then need little address space)."""
    def set_limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "minunet", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=set_limit if limit_memory else None)


def assert_one_line(result, *fragments):
    err = result.stderr.strip()
    assert result.returncode == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_float_tiff_with_nan_is_refused_not_hung(model, tmp_path, rng):
    image = rng.random((40, 40)).astype(np.float32)
    image[10, 12] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image)
    result = run_cli("predict", tmp_path / "nan.tif", "-o", tmp_path / "p.npy", "--model",
                     model, "--quiet", timeout=120)
    assert_one_line(result, "nan.tif", "1 NaN")


def test_predict_tiles_by_default_and_0_means_the_whole_image():
    parser = build_parser()
    for command in (["predict", "x.png", "-o", "y.npy"], ["count", "x.png"], ["evaluate"]):
        assert parser.parse_args(command).tile_size == DEFAULT_TILE_SIZE
    assert parser.parse_args(["train"]).predict_tile_size == DEFAULT_TILE_SIZE
    assert parser.parse_args(["count", "x.png", "--tile-size", "0"]).tile_size is None


def test_a_network_too_large_for_the_memory_is_one_line(tmp_path):
    """Under ``ulimit -v`` of 8 GiB, --depth 12 (30 GiB of weights) is refused at once; it
    used to end in a MemoryError traceback there, and be killed by the OS without a limit."""
    result = run_cli("train", "--depth", "12", "--steps", "1", "--out", tmp_path / "m.npz",
                     "--quiet", timeout=120, limit_memory=8 * 2**30)
    assert_one_line(result, "depth=12", "GiB")
    assert not (tmp_path / "m.npz").exists()


def test_training_tiles_too_large_for_the_memory_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(minunet.unet, "available_memory_bytes", lambda device: 64 * 2**20)
    monkeypatch.setattr(minunet.train, "fit", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", *TINY, "--num-images", "1", "--batch-size", "64", "--tile-size",
                 "256", "--out", str(tmp_path / "m.npz")]) == 1
    one_line_error(capsys, "64 tiles", "GiB")


def test_a_tiff_stack_is_refused_not_averaged(model, tmp_path, rng, capsys):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, rng.integers(0, 255, (5, 32, 32), np.uint8))
    assert main(["predict", str(stack), "-o", str(tmp_path / "p.npy"), "--model",
                 str(model)]) == 1
    one_line_error(capsys, "stack of 5 images")
    assert main(["count", str(stack), "--model", str(model)]) == 1
    one_line_error(capsys, "stack of 5 images")
    assert not (tmp_path / "p.npy").exists()


def test_a_colour_image_is_still_read_as_gray(model, tmp_path, rng):
    colour = tmp_path / "colour.png"
    Image.fromarray(rng.integers(0, 255, (30, 41, 3), np.uint8)).save(colour)
    assert main(["predict", str(colour), "-o", str(tmp_path / "p.npy"), "--model", str(model),
                 "--quiet"]) == 0


@pytest.mark.parametrize("fraction", ["1.5", "-1", "0", "1"])
def test_val_fraction_outside_0_1_is_refused(fraction, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--val-fraction", fraction])
    assert exit_info.value.code == 2
    assert "--val-fraction" in capsys.readouterr().err


def test_val_fraction_near_1_keeps_one_training_image(tmp_path, rng):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24), np.uint8)).save(folder / f"{i}.png")
        mask = np.zeros((24, 24), np.uint8)
        mask[4:12, 4:12] = 255
        Image.fromarray(mask).save(folder / f"{i}_mask.png")
    args = build_parser().parse_args(["train", "--data", str(folder), "--val-fraction",
                                      "0.99"])
    train, val = load_data(args, "train")
    assert (len(train), len(val)) == (1, 2)
    assert main(["train", "--data", str(folder), "--val-fraction", "0.99", "--out",
                 str(tmp_path / "m.npz"), *TINY]) == 0


def unwritable_places(tmp_path):
    """Paths no file can be written to: below a regular file, and (unless we are root, who
    may write anywhere) in a read-only folder."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    places = [blocker / "m.npz"]
    if os.geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        places.append(read_only / "m.npz")
    return places


def test_train_checks_its_outputs_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(minunet.train, "fit", lambda *a, **k: pytest.fail("training started"))
    for out in unwritable_places(tmp_path):
        assert main(["train", *TINY, "--out", str(out)]) == 1
        one_line_error(capsys, f"--out {out}")
        assert ".tmp" not in capsys.readouterr().err


def test_predict_checks_its_outputs_before_predicting(model, image_file, tmp_path,
                                                      monkeypatch, capsys):
    monkeypatch.setattr(minunet.inference, "predict",
                        lambda *a, **k: pytest.fail("prediction started"))
    for out in unwritable_places(tmp_path):
        assert main(["predict", str(image_file), "-o", str(out.with_suffix(".npy")),
                     "--model", str(model)]) == 1
        one_line_error(capsys, f"--output {out.with_suffix('.npy')}")
        assert main(["predict", str(image_file), "-o", str(tmp_path / "p.npy"), "--model",
                     str(model), "--overlay", str(out.with_suffix(".png"))]) == 1
        one_line_error(capsys, f"--overlay {out.with_suffix('.png')}")
    assert main(["predict", str(image_file), "-o", str(tmp_path / "p.jpg"), "--model",
                 str(model)]) == 1
    one_line_error(capsys, "unknown output type")


def test_a_single_array_as_model_is_one_line(image_file, tmp_path, capsys):
    np.save(tmp_path / "arr.npy", np.arange(4))
    assert main(["predict", str(image_file), "-o", str(tmp_path / "p.npy"), "--model",
                 str(tmp_path / "arr.npy")]) == 1
    one_line_error(capsys, "arr.npy", "single array", "not a minunet checkpoint")


def test_outputs_honour_the_umask(model, image_file, tmp_path):
    previous = os.umask(0o022)
    try:
        out, overlay = tmp_path / "p.npy", tmp_path / "o.png"
        assert main(["predict", str(image_file), "-o", str(out), "--model", str(model),
                     "--overlay", str(overlay), "--quiet"]) == 0
        minunet.save(minunet.load(model), tmp_path / "copy.npz")
    finally:
        os.umask(previous)
    for path in (out, overlay, tmp_path / "copy.npz"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_the_readme_commands_parse_and_name_files_that_exist():
    """Every ``python -m minunet`` line of the README parses, and every input file it names
    ships with the repository (so a new user can run them as written), except a capitalised
    placeholder such as SLIDE.tif, which stands for the reader's own file."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python -m minunet ([^#\n]*)", readme, flags=re.MULTILINE)
    assert len(commands) >= 4
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command))
        for name in ([args.image] if args.command == "predict" else
                     args.images if args.command == "count" else []):
            if not Path(name).stem.isupper():
                assert (ROOT / name).is_file(), f"README names {name}, which does not exist"
