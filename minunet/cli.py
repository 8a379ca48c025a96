"""The command line: ``python -m minunet {train,predict,evaluate,count}``.

``train`` and ``evaluate`` work without arguments, on synthetic cells, so
``python -m minunet train`` followed by ``python -m minunet evaluate`` is a complete first
experiment; ``predict`` and ``count`` need an image. Errors the user can fix (a missing
file, an unreadable image, a checkpoint that does not fit, a network too large for the
memory) end with one line on stderr and exit status 1, never with a traceback. Every output
path is checked for writability before the work starts, and outputs are written atomically
(:mod:`minunet.files`), so an existing file is never replaced by a partial one.

Reading and writing images and overlays lives in :mod:`minunet.data`; this module parses
the arguments and runs the steps in order.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

from minunet.files import check_writable, write_json
from minunet.inference import DEFAULT_TILE_SIZE

DEFAULT_MODEL = os.path.join("runs", "minunet.npz")
TRAIN_SEED, EVALUATE_SEED = 0, 1000
DATA_HELP = (
    "'synthetic' (generated cells, the default), 'dsb2018' (the DSB 2018 nuclei image from "
    "the stardist package: left half to train, right half to validate), or a folder: the "
    "ISBI 2012 training set (train-volume.tif/train-labels.tif or train/image, train/label) "
    "or image/mask pairs (images/NAME + masks/NAME, or NAME + NAME_mask)"
)


class UserError(Exception):
    """A problem with the command's inputs, reported as one line."""


# --- small helpers --------------------------------------------------------------------------


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], stream=None) -> None:
    """Print ``rows`` as an aligned text table; ``columns``: (key, header, format spec)."""
    stream = stream or sys.stdout
    cells = [[format(row[key], spec) if row.get(key) is not None else "-"
              for key, _, spec in columns] for row in rows]
    widths = [max(len(header), *(len(c[i]) for c in cells)) if cells else len(header)
              for i, (_, header, _) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True)), file=stream)
    print("  ".join("-" * w for w in widths), file=stream)
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)), file=stream)


def load_model(path, device: str):
    import minunet

    if not Path(path).is_file():
        if path in minunet.list_pretrained():
            return to_device(minunet.pretrained(path), device)
        raise UserError(f"--model: no model file {path} and no pretrained model of that name "
                        f"(pretrained: {', '.join(minunet.list_pretrained()) or 'none'}; or "
                        f"train one with: python -m minunet train)")
    net = minunet.load(path)
    return to_device(net, device)


def to_device(net, device: str):
    if device == "gpu":
        from minunet.backend import require_cupy

        require_cupy()  # RuntimeError with the reason, reported as one line
        net.to("cupy")
    return net


def read_input_image(path, net):
    """An image file as float32 (C, H, W) in [0, 1] for ``net``. A colour image (H, W, 3 or
    4) is averaged to gray for a one-channel network; a stack of planes (a multi-page TIFF)
    is refused unless its planes are the network's channels."""
    from minunet.data import as_image, is_colour, read_image

    raw = read_image(path)
    image = as_image(raw, name=str(path))
    channels = net.config["in_channels"]
    planes = image.shape[0] if image.ndim == 3 else 1
    colour = is_colour(raw)
    if colour and channels == 1:
        return image.mean(axis=0)
    if planes == channels:
        return image
    if image.ndim == 2:
        raise UserError(f"{path} is a gray image but the model expects {channels} channels")
    if not colour:
        raise UserError(f"{path} is a stack of {planes} images of {image.shape[1]}x"
                        f"{image.shape[2]} pixels, but the model takes one image with "
                        f"{channels} channel(s): nothing was predicted; save each slice as "
                        f"its own image and pass those")
    raise UserError(f"{path} has {planes} colour channels, the model expects {channels}")


def load_data(args, split: str):
    """``(train, val)`` datasets for ``--data`` (see DATA_HELP); ``split`` is 'train' or
    'evaluate' (evaluation on synthetic data uses fresh images)."""
    from minunet.data import (
        Dataset,
        load_dsb2018_nuclei,
        load_folder,
        load_isbi2012,
        synthetic_cells,
    )

    if args.seed is None:
        args.seed = TRAIN_SEED if split == "train" else EVALUATE_SEED
    if args.data == "synthetic":
        size = args.image_size
        if split == "train":
            images, labels = synthetic_cells(args.num_images, size, seed=args.seed)
            val_images, val_labels = synthetic_cells(max(1, args.num_images // 4), size,
                                                     seed=args.seed + 1)
        else:
            images = labels = np.zeros((0, size, size))
            val_images, val_labels = synthetic_cells(args.num_images, size, seed=args.seed)
        return (Dataset(list(images), list(labels), [f"synthetic_{i}" for i in range(len(images))]),
                Dataset(list(val_images), list(val_labels),
                        [f"synthetic_val_{i}" for i in range(len(val_images))]))
    if args.data == "dsb2018":
        image, labels = load_dsb2018_nuclei()[0]
        half = image.shape[-1] // 2
        return (Dataset([image[..., :half]], [labels[:, :half]], ["dsb2018_left"]),
                Dataset([image[..., half:]], [labels[:, half:]], ["dsb2018_right"]))
    root = Path(args.data)
    if not root.exists():
        raise UserError(f"--data {args.data}: no such folder (choose {DATA_HELP})")
    isbi = (root / "train-volume.tif").is_file() or (root / "train" / "image").is_dir()
    classes = getattr(args, "num_classes", 2) > 2
    if isbi and classes:
        raise UserError("--num-classes: ISBI 2012 has two classes (membrane, cell)")
    data = load_isbi2012(root) if isbi else load_folder(root,
                                                        kind="classes" if classes else "auto")
    if len(data) < 2:
        return data, data
    # at least one image on each side, whatever the fraction
    num_val = min(max(1, int(round(len(data) * args.val_fraction))), len(data) - 1)
    return data[: len(data) - num_val], data[len(data) - num_val:]


# --- subcommands ----------------------------------------------------------------------------


def train_outputs(args) -> tuple[Path, Path]:
    """``(history, overlay)`` paths of ``train``, after checking that every output of the run
    (--out, the history, the overlay, --checkpoint) can be written."""
    history = Path(args.out).with_suffix(".history.json")
    overlay = Path(args.overlay or str(Path(args.out).with_suffix("")) + "_overlay.png")
    check_writable(args.out, "--out")
    check_writable(history, "history file")
    check_writable(overlay, "--overlay")
    if args.checkpoint:
        check_writable(args.checkpoint, "--checkpoint")
    return history, overlay


def require_training_memory(net, args) -> None:
    """Refuse (MemoryError, one line) a training run whose estimated peak memory
    (:meth:`minunet.UNet.training_memory_bytes`) exceeds what is available."""
    from minunet.functional.threads import share_count
    from minunet.unet import require_memory

    tile = net.input_size_for_output(args.tile_size)
    # training splits the batch across threads, one replica's gradients per extra share
    needed = net.training_memory_bytes(tile, args.batch_size,
                                       optimizer_slots=2 if args.optimizer == "adam" else 1,
                                       shares=min(args.batch_size, share_count()))
    require_memory(needed, f"training steps on {args.batch_size} tiles of {tile}x{tile} with "
                           f"--depth {args.depth} --base-channels {args.base_channels}",
                   net.device)


def as_boundary_classes(data):
    """``data`` with its instance labels replaced by the three-class targets (background,
    interior, boundary) of :func:`minunet.data.boundary_classes`."""
    from minunet.data import Dataset, boundary_classes

    return Dataset(list(data.images), [boundary_classes(labels) for labels in data.labels],
                   list(data.names))


def instances(prob, *, threshold: float, min_size: int):
    """Cell labels from a network's probabilities: cell/background networks through
    ``label_instances``, three-class networks (background, interior, boundary) by growing
    their interiors (``label_boundary_classes``)."""
    from minunet.postprocess import label_boundary_classes, label_instances

    if prob.shape[0] == 2:
        return label_instances(prob, threshold=threshold, min_size=min_size)
    if prob.shape[0] == 3:
        return label_boundary_classes(prob, min_size=min_size)
    raise UserError(f"the network has {prob.shape[0]} classes: cells are counted with "
                    f"cell/background or background/interior/boundary networks")


def command_train(args) -> int:
    import minunet
    from minunet.data import save_overlay
    from minunet.train import fit

    history_path, overlay = train_outputs(args)
    train, val = load_data(args, "train")
    if args.num_classes > 2 and args.data in ("synthetic", "dsb2018"):
        if args.num_classes != 3:
            raise UserError(f"--num-classes {args.num_classes}: the cells of --data "
                            f"{args.data} give 2 classes, or 3 (background, interior, "
                            f"boundary); more need a folder of class-index masks")
        train, val = (as_boundary_classes(data) for data in (train, val))
    channels = train.images[0].shape[0] if train.images[0].ndim == 3 else 1
    net = minunet.UNet(in_channels=channels, depth=args.depth, base_channels=args.base_channels,
                       padding=args.padding, batch_norm=args.batch_norm, dropout=args.dropout,
                       num_classes=args.num_classes, seed=args.seed)
    to_device(net, args.device)
    require_training_memory(net, args)
    if not args.quiet:
        print(f"training {net!r} on {len(train)} image(s), validating on {len(val)}",
              file=sys.stderr)
    start = time.perf_counter()
    history = fit(net, train, val, steps=args.steps, steps_per_epoch=args.steps_per_epoch,
                  batch_size=args.batch_size, tile_size=args.tile_size,
                  optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                  augment=not args.no_augment,
                  weight_maps=not args.no_weight_maps and args.num_classes == 2,
                  seed=args.seed, checkpoint_path=args.checkpoint, resume=args.resume,
                  progress=not args.quiet, keep_best="iou")
    seconds = time.perf_counter() - start
    minunet.save(net, args.out)
    write_json(history_path, {"config": net.config, "seconds": seconds, **history.as_dict()})
    image, _ = val[0]
    prob = minunet.predict(net, image, tile_size=args.predict_tile_size)
    if args.num_classes > 3:  # classes, not cells: the overlay shows the class map
        save_overlay(overlay, image, prob.argmax(axis=0), f"{val.names[0]}: classes")
    else:
        found = instances(prob, threshold=0.5, min_size=10)
        save_overlay(overlay, image, found, f"{val.names[0]}: {found.max()} cells found")
    if args.num_classes == 2:
        columns = [("val_iou", "val IoU", ".3f"), ("val_dice", "val Dice", ".3f"),
                   ("val_f1", "val F1", ".3f"), ("val_count_error", "count err", ".1%")]
    else:  # per-class scores
        columns = [(f"val_iou_{c}", f"IoU class {c}", ".3f")
                   for c in range(1, args.num_classes)]
        columns.append(("val_pixel_error", "pixel err", ".4f"))
    print_table(history.epochs, [("epoch", "epoch", "d"), ("step", "step", "d"),
                                 ("train_loss", "loss", ".4f"), *columns,
                                 ("seconds", "seconds", ".1f")])
    best = history.epochs[history.best_epoch - 1]
    print(f"kept the weights of epoch {history.best_epoch} of {len(history.epochs)}, the best "
          f"on validation (IoU {best['val_iou']:.3f})")
    print(f"model: {args.out}  history: {history_path}  overlay: {overlay}  "
          f"({seconds:.0f} s)")
    return 0


def min_cell_size(args) -> int:
    """``--min-size``, else what a pretrained model's card recommends, else 10 pixels."""
    import minunet

    if args.min_size is not None:
        return args.min_size
    if not Path(args.model).is_file() and args.model in minunet.list_pretrained():
        return minunet.model_card(args.model).get("postprocess", {}).get("min_size", 10)
    return 10


def command_predict(args) -> int:
    if args.chunk_size:
        return command_slide(args, [args.image])
    from minunet.data import check_array_suffix, save_overlay, write_array
    from minunet.inference import predict

    for option, path in (("--output", args.output), ("--labels", args.labels),
                         ("--overlay", args.overlay)):
        if path:
            if option != "--overlay":
                check_array_suffix(path)
            check_writable(path, option)
    net = load_model(args.model, args.device)
    image = read_input_image(args.image, net)
    prob = predict(net, image, tile_size=args.tile_size, tta=args.tta, progress=not args.quiet)
    labels = (prob.argmax(axis=0) if prob.shape[0] > 3  # classes, not cells
              else instances(prob, threshold=args.threshold, min_size=min_cell_size(args)))
    write_array(args.output, prob, kind="probabilities")
    if args.labels:
        write_array(args.labels, labels, kind="labels")
    if args.overlay:
        save_overlay(args.overlay, image, labels)
    found = f"{labels.max()} cells" if prob.shape[0] <= 3 else f"{prob.shape[0]} classes"
    print(f"{args.image}: {found}; probabilities written to {args.output}")
    return 0


def command_evaluate(args) -> int:
    from minunet.inference import predict
    from minunet.metrics import segmentation_report

    if args.json:
        check_writable(args.json, "--json")
    net = load_model(args.model, args.device)
    _, data = load_data(args, "evaluate")
    min_size = min_cell_size(args)
    rows = []
    for name, image, truth in zip(data.names, data.images, data.labels, strict=True):
        prob = predict(net, image, tile_size=args.tile_size, tta=args.tta)
        found = instances(prob, threshold=args.threshold, min_size=min_size)
        rows.append({"image": name, **segmentation_report(found, truth)})
    keys = [k for k in rows[0] if k != "image"]
    mean = {"image": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    print_table(rows + [mean], [("image", "image", "s"), ("iou", "IoU", ".3f"),
                                ("dice", "Dice", ".3f"), ("pixel_error", "pixel err", ".4f"),
                                ("rand_error", "Rand err", ".4f"), ("f1", "F1", ".3f"),
                                ("true_count", "cells", ".0f"), ("pred_count", "found", ".0f"),
                                ("relative_count_error", "count err", ".1%")])
    if args.json:
        write_json(args.json, {"model": str(args.model), "data": args.data, "images": rows,
                               "mean": mean})
    return 0


def command_count(args) -> int:
    if args.chunk_size:
        return command_slide(args, args.images)
    from minunet.data import save_overlay
    from minunet.inference import predict

    if args.overlay_dir:
        check_writable(Path(args.overlay_dir) / f"{Path(args.images[0]).stem}_overlay.png",
                       "--overlay-dir")
    net = load_model(args.model, args.device)
    min_size = min_cell_size(args)
    rows = []
    for path in args.images:
        image = read_input_image(path, net)
        prob = predict(net, image, tile_size=args.tile_size, tta=args.tta)
        labels = instances(prob, threshold=args.threshold, min_size=min_size)
        rows.append({"image": str(path), "cells": int(labels.max())})
        if args.overlay_dir:
            save_overlay(Path(args.overlay_dir) / f"{Path(path).stem}_overlay.png", image,
                         labels)
    print_table(rows, [("image", "image", "s"), ("cells", "cells", "d")])
    return 0


# --- whole slides: predict/count with --chunk-size, streamed on Dask ------------------------


def add_slide_options(parser) -> None:
    group = parser.add_argument_group(
        "whole slides", "with --chunk-size the image is read, predicted and counted chunk by "
                        "chunk on Dask (TIFF level 0 or Zarr store; it is never held whole)")
    group.add_argument("--chunk-size", type=_positive, default=None,
                       help="edge of the chunks in pixels (e.g. 2048): turns on the "
                            "whole-slide mode")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="a running dask.distributed scheduler (tcp://HOST:PORT); "
                            "default: Dask's local threads")
    group.add_argument("--zarr", default=None,
                       help="probabilities as a Zarr store (default: -o for predict, "
                            "SLIDE_probabilities.zarr for count)")
    group.add_argument("--probability-dtype", choices=("float16", "uint8"), default="float16",
                       help="stored probabilities: float16 or uint8 (x 255) (default float16)")
    group.add_argument("--csv", default=None,
                       help="cell centroids (row, col, area) in slide pixels "
                            "(default: next to the Zarr store, NAME_cells.csv)")


def connect_scheduler(address: str | None, timeout: str = "3s"):
    """A ``dask.distributed`` client for ``address`` (None: no client, Dask's local
    scheduler); a scheduler that does not answer within ``timeout`` is a UserError."""
    if not address:
        return contextlib.nullcontext()
    import logging

    from distributed import Client

    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the retries are logged; the user gets one line
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise UserError(f"--scheduler {address}: no Dask scheduler answers there "
                        f"({type(exc).__name__})") from exc
    finally:
        quiet.setLevel(level)


def command_slide(args, slides_given) -> int:
    """predict/count of one whole slide: probabilities to Zarr (progress over chunks), cell
    centroids to CSV, and a downsampled overlay PNG."""
    from minunet import slides
    from minunet.data import save_slide_overlay, write_centroids

    if len(slides_given) != 1:
        raise UserError("--chunk-size takes one slide at a time")
    slide = slides_given[0]
    stem = Path(slide).stem
    store = Path(args.zarr or getattr(args, "output", None) or f"{stem}_probabilities.zarr")
    if store.suffix != ".zarr":
        raise UserError(f"{store}: with --chunk-size the probabilities are written to a Zarr "
                        "store; name it NAME.zarr")
    csv_path = Path(args.csv or store.with_name(store.stem + "_cells.csv"))
    if getattr(args, "overlay_dir", None):
        overlay = Path(args.overlay_dir) / f"{stem}_overlay.png"
    else:
        overlay = Path(getattr(args, "overlay", None) or store.with_name(stem + "_overlay.png"))
    for path, what in ((store, "probabilities"), (csv_path, "--csv"), (overlay, "overlay")):
        check_writable(path, what)
    net = load_model(args.model, args.device)
    with connect_scheduler(args.scheduler):  # from here on, every pass runs on the cluster
        probabilities = slides.predict(net, slide, chunk_size=args.chunk_size,
                                       tile_size=args.tile_size, tta=args.tta)
        slides.write_probabilities(probabilities, store, dtype=args.probability_dtype,
                                   progress=not args.quiet)
        found = slides.count_cells(str(store), chunk_size=args.chunk_size,
                                   threshold=args.threshold, progress=not args.quiet)
        image = slides.prepare_slide(slide, net.config["in_channels"], args.chunk_size)
        save_slide_overlay(overlay, image.mean(axis=0), found, slide)
    write_centroids(csv_path, found)
    print(f"{slide}: {found.count} cells; probabilities: {store}  centroids: {csv_path}  "
          f"overlay: {overlay}")
    return 0


# --- argument parsing -----------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _tile_size(text: str) -> int | None:
    """A tile edge in pixels; 0 means the whole image in one pass (``None``)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 0, got {text}")
    return value or None


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minunet",
        description="Segment and count cells with a U-Net written from scratch. 'train' "
                    "and 'evaluate' work without arguments, on synthetic cells.",
        epilog="example: python -m minunet train && python -m minunet evaluate && "
               "python -m minunet count cells.png --overlay-dir overlays",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where to compute: NumPy on the CPU, or CuPy on an NVIDIA GPU "
                             "(default: cpu)")
    common.add_argument("--threads", type=_positive, default=None,
                        help="BLAS threads (default: the library's choice; 1 is fastest on "
                             "a busy machine)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    inference = argparse.ArgumentParser(add_help=False)
    inference.add_argument("--model", default=DEFAULT_MODEL,
                           help=f"trained network: a .npz written by train, or the name of a "
                                f"pretrained model (isbi2012, dsb2018); default {DEFAULT_MODEL}")
    inference.add_argument("--tile-size", type=_tile_size, default=DEFAULT_TILE_SIZE,
                           help="edge of the output tile per forward pass, which bounds the "
                                f"memory (default {DEFAULT_TILE_SIZE}; 0: the whole image "
                                "at once)")
    inference.add_argument("--min-size", type=_positive, default=None,
                           help="smallest cell kept, in pixels (default: what a pretrained "
                                "model's card recommends, else 10)")
    inference.add_argument("--tta", action="store_true",
                           help="average over the 8 rotations/flips (test-time augmentation)")
    inference.add_argument("--threshold", type=float, default=0.5,
                           help="foreground probability above which a pixel is a cell "
                                "(default 0.5)")

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", default="synthetic", help=f"the data: {DATA_HELP}")
    data.add_argument("--image-size", type=_positive, default=128,
                      help="edge of the synthetic images (default 128)")
    data.add_argument("--seed", type=int, default=None,
                      help="seed of the synthetic data, the network and the training "
                           f"(default: {TRAIN_SEED} for train, {EVALUATE_SEED} for evaluate, "
                           "so evaluation sees images that training did not)")
    data.add_argument("--val-fraction", type=_fraction, default=0.2,
                      help="share of a folder's images kept for validation, between 0 and 1 "
                           "(default 0.2; at least one image stays on each side)")

    train = sub.add_parser("train", parents=[common, data], help="train a U-Net",
                           description="Train a U-Net and save it; prints a summary table "
                                       "and writes a history (JSON) and an overlay (PNG).")
    train.add_argument("--num-images", type=_positive, default=12,
                       help="synthetic training images (default 12; validation: a quarter "
                            "as many, from another seed)")
    train.add_argument("--depth", type=_positive, default=3,
                       help="resolution levels of the U-Net (paper: 5; default 3)")
    train.add_argument("--base-channels", type=_positive, default=8,
                       help="channels of the top level, doubled per level (paper: 64; "
                            "default 8)")
    train.add_argument("--num-classes", type=_positive, default=2,
                       help="2: cell/background (default); 3 on synthetic/dsb2018 data: "
                            "background, interior and boundary of every cell; with a folder "
                            "of class-index masks (0 .. N-1), N classes")
    train.add_argument("--padding", choices=("same", "valid"), default="same",
                       help="'valid' convolutions as in the paper, or 'same' (default)")
    train.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                       help="BatchNorm after each convolution (default: on)")
    train.add_argument("--dropout", type=float, default=0.0,
                       help="dropout at the bottom of the U (default 0)")
    train.add_argument("--steps", type=_positive, default=80,
                       help="training steps (default 80)")
    train.add_argument("--steps-per-epoch", type=_positive, default=None,
                       help="steps between validations/checkpoints (default: one pass "
                            "over the training pixels)")
    train.add_argument("--batch-size", type=_positive, default=4,
                       help="tiles per step (default 4)")
    train.add_argument("--tile-size", type=_positive, default=64,
                       help="edge of the output tile (default 64)")
    train.add_argument("--predict-tile-size", type=_tile_size, default=DEFAULT_TILE_SIZE,
                       help="tile size for the final overlay prediction (default "
                            f"{DEFAULT_TILE_SIZE}; 0: the whole image)")
    train.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                       help="Adam (default) or SGD with momentum (the paper's)")
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: 1e-3 for Adam, 0.01 for SGD)")
    train.add_argument("--momentum", type=float, default=0.99,
                       help="SGD momentum (paper: 0.99)")
    train.add_argument("--no-augment", action="store_true",
                       help="no rotations/flips, elastic deformations or gray-value changes")
    train.add_argument("--no-weight-maps", action="store_true",
                       help="class-balanced weights only, without the paper's border term")
    train.add_argument("--out", default=DEFAULT_MODEL,
                       help=f"where to save the network (default {DEFAULT_MODEL})")
    train.add_argument("--checkpoint", default=None,
                       help="training checkpoint written after every epoch (for --resume)")
    train.add_argument("--resume", action="store_true",
                       help="continue from --checkpoint if it exists")
    train.add_argument("--overlay", default=None,
                       help="overlay PNG of a validation image (default: next to --out)")
    train.set_defaults(run=command_train)

    predict = sub.add_parser("predict", parents=[common, inference],
                             help="segment one image",
                             description="Write the class probabilities of an image.")
    predict.add_argument("image", help="input image (PNG, TIFF, JPEG...)")
    predict.add_argument("-o", "--output", required=True,
                         help="probabilities: .npy (C, H, W float32), .tif, or .png "
                              "(foreground probability as 8-bit gray)")
    predict.add_argument("--labels", default=None,
                         help="also write the labelled cells (.tif, .png or .npy)")
    predict.add_argument("--overlay", default=None, help="also write an overlay PNG")
    add_slide_options(predict)
    predict.set_defaults(run=command_predict)

    evaluate = sub.add_parser("evaluate", parents=[common, inference, data],
                              help="score a model on labelled images",
                              description="IoU, Dice, pixel error, Rand error, object F1 and "
                                          "count error per image and on average.")
    evaluate.add_argument("--num-images", type=_positive, default=4,
                          help="synthetic evaluation images (default 4)")
    evaluate.add_argument("--json", default=None, help="also write the scores as JSON")
    evaluate.set_defaults(run=command_evaluate)

    count = sub.add_parser("count", parents=[common, inference], help="count cells",
                           description="Count the cells in one or more images.")
    count.add_argument("images", nargs="+", help="input images")
    count.add_argument("--overlay-dir", default=None,
                       help="write NAME_overlay.png for every image into this folder")
    add_slide_options(count)
    count.set_defaults(run=command_count)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 success, 1 error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    limits = contextlib.nullcontext()
    if args.threads:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads)
    try:
        with limits:
            return args.run(args)
    except KeyboardInterrupt:
        print("minunet: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, ValueError, TypeError, OSError, RuntimeError,
            FloatingPointError, MemoryError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"minunet {args.command}: error: {message}", file=sys.stderr)
        return 1
