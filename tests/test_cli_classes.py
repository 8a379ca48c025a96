"""The command line with more than two classes: the three-class nucleus target and folders
of class-index masks."""

import json

import numpy as np
from PIL import Image

import minunet
from minunet.cli import main

TINY = ["--image-size", "32", "--depth", "2", "--base-channels", "4", "--steps", "2",
        "--tile-size", "16", "--batch-size", "1", "--quiet"]


def test_three_classes_from_synthetic_cells(tmp_path, capsys):
    out = tmp_path / "net.npz"
    assert main(["train", "--num-images", "2", "--num-classes", "3", "--out", str(out),
                 *TINY]) == 0
    history = json.loads(out.with_suffix(".history.json").read_text())
    assert {"val_iou_1", "val_iou_2", "val_pixel_error"} <= set(history["epochs"][-1])
    assert "IoU class 2" in capsys.readouterr().out
    assert minunet.load(out).config["num_classes"] == 3
    image = tmp_path / "cells.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(
        image)
    assert main(["count", str(image), "--model", str(out), "--quiet"]) == 0


def test_more_classes_need_class_masks(tmp_path, capsys):
    assert main(["train", "--num-classes", "4", "--out", str(tmp_path / "n.npz"),
                 *TINY]) != 0
    error = capsys.readouterr().err
    assert "--num-classes 4" in error and "Traceback" not in error

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        image = (rng.random((32, 32)) * 255).astype(np.uint8)
        classes = np.repeat(np.arange(4, dtype=np.uint8), 8)[None].repeat(32, axis=0)
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"{i}.png")
        Image.fromarray(classes).save(tmp_path / "data" / "masks" / f"{i}.png")
    out = tmp_path / "four.npz"
    assert main(["train", "--data", str(tmp_path / "data"), "--num-classes", "4",
                 "--out", str(out), *TINY]) == 0
    assert minunet.load(out).config["num_classes"] == 4
    image = tmp_path / "data" / "images" / "0.png"
    assert main(["count", str(image), "--model", str(out), "--quiet"]) != 0
    assert "cells are counted with" in capsys.readouterr().err
