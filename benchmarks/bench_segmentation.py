"""Segmentation results of minunet on three data sets, each trained within a time budget.

    python benchmarks/bench_segmentation.py synthetic  [--minutes 10]
    python benchmarks/bench_segmentation.py dsb2018    [--minutes 4]
    python benchmarks/bench_segmentation.py isbi2012   [--minutes 5] [--data PATH]
    python benchmarks/bench_segmentation.py isbi2012 --model isbi2012   (a shipped model)

* synthetic: a small U-Net trained from scratch on synthetic cells, scored on held-out
  synthetic images (foreground IoU, object F1, count error). Targets: IoU >= 0.90 and mean
  absolute relative count error <= 5 %.
* dsb2018: the Data Science Bowl 2018 nuclei image that ships with stardist (125 nuclei):
  trained on its left half with augmentation, scored on its right half.
* isbi2012: the ISBI 2012 EM training set (30 images; needs the data, default
  ``../shared/data/isbi2012`` relative to the repository root): trained on 25, scored on 5;
  pixel error and Rand error next to the paper's Table 1, both as the challenge defined
  them (``1 -`` the best F-score over thresholds, of the pixels and of the Rand index), with
  the plain misclassified fraction too. The paper's figures are on the challenge's hidden
  test set: a reference point, not a like-for-like match.

With ``--model NAME`` (a pretrained model shipped in ``minunet/models``, or a checkpoint
path) nothing is trained: that network is scored on the same test split, with and without
test-time augmentation.

Each run prints its figures and writes ``benchmarks/results/segmentation_<name>.json``
(``<name>_plain_loss`` with ``--plain-loss``, ``<name>_pretrained`` with ``--model``).
Training time is wall-clock on the machine at hand, so results depend on its speed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import minunet
from minunet.data import load_dsb2018_nuclei, load_isbi2012, synthetic_cells
from minunet.files import write_json
from minunet.inference import predict
from minunet.metrics import (
    best_pixel_error,
    best_rand_error,
    count_objects,
    iou,
    merges_and_splits,
    object_scores,
    pixel_error,
)
from minunet.postprocess import label_instances
from minunet.train import fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAPER_ISBI = {"rand_error": 0.0382, "pixel_error": 0.0611, "warping_error": 0.000353}


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` (plus date and machine) to results/segmentation_<name>.json, atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"segmentation_{name}.json"
    payload = {"benchmark": name,
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "python": platform.python_version(), "numpy": np.__version__,
               "cpu_count": os.cpu_count(), **payload}
    write_json(path, payload)
    return path


def instance_scores(net, images, labels, *, tta: bool, separate: bool = True,
                    min_size: int = 10) -> dict:
    """Mean foreground IoU, object F1 (IoU 0.5), merges and splits, and absolute relative
    count error of the cells found by ``label_instances`` (``separate``, ``min_size``)."""
    rows = []
    for image, truth in zip(images, labels, strict=True):
        found = label_instances(predict(net, image, tta=tta), separate=separate,
                                min_size=min_size)
        true_count = count_objects(truth)
        rows.append({"iou": iou(found, truth), "f1": object_scores(found, truth).f1,
                     **merges_and_splits(found, truth),
                     "true_count": true_count, "found_count": count_objects(found),
                     "count_error": abs(count_objects(found) - true_count) / max(true_count, 1)})
    means = {k: float(np.mean([r[k] for r in rows]))
             for k in ("iou", "f1", "count_error", "merges", "splits")}
    return {**means, "per_image": rows}


def train(net, train_data, val_data, args, **overrides) -> tuple[dict, float]:
    settings = dict(batch_size=args.batch_size, tile_size=args.tile_size, optimizer="adam",
                    lr=args.lr, steps=10**6, steps_per_epoch=args.steps_per_epoch,
                    seed=args.seed, max_seconds=60 * args.minutes, progress=not args.quiet)
    if args.plain_loss:
        settings.update(weight_maps=False, class_weights=(1.0, 1.0))
    settings.update(overrides)
    start = time.perf_counter()
    history = fit(net, train_data, val_data, **settings)
    seconds = time.perf_counter() - start
    settings.update(steps_done=len(history.loss), train_seconds=round(seconds, 1),
                    final_loss=float(np.mean(history.loss[-20:])))
    settings.pop("progress")
    return {"settings": settings, "epochs": history.epochs}, seconds


def bench_synthetic(args) -> dict:
    images, labels = synthetic_cells(args.train_images, args.size, seed=args.seed)
    val = synthetic_cells(2, args.size, seed=args.seed + 1)
    test_images, test_labels = synthetic_cells(args.test_images, args.size, seed=10_000)
    net = minunet.UNet(depth=args.depth, base_channels=args.base_channels, padding="same",
                       batch_norm=True, seed=args.seed)
    log, seconds = train(net, (images, labels), val, args)
    result = {"network": net.config, "train_images": args.train_images,
              "test_images": args.test_images, "image_size": args.size, **log,
              "test": instance_scores(net, test_images, test_labels, tta=False),
              "test_tta": instance_scores(net, test_images, test_labels, tta=True)}
    for key in ("test", "test_tta"):
        scores = result[key]
        print(f"synthetic {key:9s} IoU {scores['iou']:.3f}  F1 {scores['f1']:.3f}  "
              f"count error {scores['count_error']:.1%}  (targets: IoU >= 0.90, count <= 5%)")
    print(f"trained {log['settings']['steps_done']} steps in {seconds:.0f} s")
    if args.save_model:
        minunet.save(net, args.save_model)
    return result


def bench_dsb2018(args) -> dict:
    image, labels = load_dsb2018_nuclei()[0]
    half = image.shape[-1] // 2
    train_data = ([image[:, :half]], [labels[:, :half]])
    test_image, test_labels = image[:, half:], labels[:, half:]
    net, log, seconds = trained_or_loaded(args, train_data, None)
    # a pretrained model's card may recommend a smallest cell size (chosen on training data)
    min_size = (log.get("postprocess") or {}).get("min_size", 10)
    result = {"network": net.config, "split": "train: columns 0-255, test: columns 256-511",
              **log, "min_size": min_size}
    for key, tta in (("test", False), ("test_tta", True)):
        result[key] = instance_scores(net, [test_image], [test_labels], tta=tta,
                                      min_size=min_size)
    if min_size != 10:
        result["test_min_size_10"] = instance_scores(net, [test_image], [test_labels],
                                                     tta=False)
    for key in [key for key in result if key.startswith("test")]:
        scores, row = result[key], result[key]["per_image"][0]
        print(f"dsb2018 right half {key:9s} IoU {scores['iou']:.3f}  F1 {scores['f1']:.3f}  "
              f"nuclei {row['true_count']} found {row['found_count']} "
              f"(count error {scores['count_error']:.1%})")
    report_training(log, seconds)
    return result


def bench_isbi2012(args) -> dict:
    root = Path(args.data) if args.data else ROOT.parent / "shared" / "data" / "isbi2012"
    if not root.exists():
        print(f"ISBI 2012 data not found at {root}; pass --data PATH", file=sys.stderr)
        raise SystemExit(2)
    data = load_isbi2012(root)
    train_data, test_data = data[:25], data[25:]
    net, log, seconds = trained_or_loaded(args, train_data, None, border_width=0)
    result = {"network": net.config, "split": "train: images 0-24, test: images 25-29", **log,
              "paper_table1_hidden_test_set": PAPER_ISBI}
    for key, tta in (("test", False), ("test_tta", True)):
        if tta and not (args.tta or args.model):
            continue
        threshold = (log.get("postprocess") or {}).get(
            "rand_threshold_tta" if tta else "rand_threshold")
        result[key] = isbi_scores(net, test_data, tta, threshold)
        scores = result[key]
        for kind in ("grown", "components"):
            rand = scores[kind]
            print(f"isbi2012 slices 25-29 {key:8s} pixel error {scores['pixel_error']:.4f} "
                  f"(misclassified {scores['misclassified_at_0.5']:.4f})  "
                  f"Rand error ({kind}) {rand['rand_error']:.4f} (threshold "
                  f"{rand['best_threshold']})  VI {rand['vi']['vi']:.3f}")
    print(f"paper, Table 1 (hidden test set):       pixel error {PAPER_ISBI['pixel_error']:.4f}"
          f"  Rand error {PAPER_ISBI['rand_error']:.4f}")
    report_training(log, seconds)
    return result


def isbi_scores(net, test_data, tta: bool, chosen_threshold: float | None = None) -> dict:
    """The ISBI 2012 scores of ``net`` on ``test_data``: the challenge's pixel error
    (``1 -`` the best pixel F-score over thresholds, :func:`minunet.metrics.best_pixel_error`),
    the fraction of pixels misclassified at threshold 0.5, and the foreground-restricted
    Rand error (1 - Rand F-score) and variation of information at
    the best threshold for all slices together, for two kinds of segments (see
    :func:`minunet.metrics.threshold_segments`): ``grown`` (the thresholded components
    grown over the predicted membranes, a label for every pixel) and ``components`` (the
    components alone; predicted-membrane pixels inside true cells count as singletons).
    With ``chosen_threshold`` (chosen beforehand on validation images), the Rand error at
    that threshold is reported too."""
    probabilities = [predict(net, image, tta=tta)[1] for image in test_data.images]
    pixels = best_pixel_error(probabilities, test_data.labels)
    scores = {"pixel_error": pixels["pixel_error"],
              "pixel_error_threshold": pixels["threshold"],
              "misclassified_at_0.5": float(np.mean([
                  pixel_error(p > 0.5, truth)
                  for p, truth in zip(probabilities, test_data.labels, strict=True)]))}
    for name, grow in (("grown", True), ("components", False)):
        rand = best_rand_error(probabilities, test_data.labels, grow=grow)
        scores[name] = {"rand_error": rand["rand_error"], "best_threshold": rand["threshold"],
                        "vi": rand["vi"], "rand_error_by_threshold": rand["by_threshold"]}
        if chosen_threshold is not None:
            at_chosen = best_rand_error(probabilities, test_data.labels, [chosen_threshold],
                                        grow=grow)
            scores[name]["at_validation_threshold"] = {
                "threshold": chosen_threshold, "rand_error": at_chosen["rand_error"],
                "vi": at_chosen["vi"]}
    return scores


def trained_or_loaded(args, train_data, val_data, **overrides):
    """``(net, log, seconds)``: the network of ``--model``, or one trained here."""
    if args.model:
        net = (minunet.pretrained(args.model) if args.model in minunet.list_pretrained()
               else minunet.load(args.model))
        card = minunet.model_card(args.model) if args.model in minunet.list_pretrained() else {}
        return net, {"model": args.model, "training": card.get("training"),
                     "postprocess": card.get("postprocess")}, 0.0
    net = minunet.UNet(depth=args.depth, base_channels=args.base_channels, padding="same",
                       batch_norm=True, seed=args.seed)
    log, seconds = train(net, train_data, val_data, args, **overrides)
    return net, log, seconds


def report_training(log: dict, seconds: float) -> None:
    if "settings" in log:
        print(f"trained {log['settings']['steps_done']} steps in {seconds:.0f} s")
    else:
        print(f"scored the pretrained model {log['model']}")


DEFAULTS = {  # (minutes, depth, base_channels, tile_size, batch_size)
    "synthetic": (10.0, 4, 16, 96, 4),
    "dsb2018": (4.0, 4, 16, 96, 4),
    "isbi2012": (5.0, 4, 16, 128, 2),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(DEFAULTS))
    parser.add_argument("--minutes", type=float, help="training time budget")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--base-channels", type=int)
    parser.add_argument("--tile-size", type=int, help="output tile edge during training")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=24, help="synthetic only")
    parser.add_argument("--test-images", type=int, default=8, help="synthetic only")
    parser.add_argument("--size", type=int, default=256, help="synthetic image edge")
    parser.add_argument("--data", help="ISBI 2012 folder")
    parser.add_argument("--tta", action="store_true", help="ISBI: test-time augmentation")
    parser.add_argument("--plain-loss", action="store_true",
                        help="unweighted cross-entropy (no Eq. 2 map, no class balancing)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (default 1: fastest when the machine is shared)")
    parser.add_argument("--save-model", help="synthetic: also save the trained network")
    parser.add_argument("--model", help="dsb2018/isbi2012: score this pretrained model (a "
                                        "name from minunet.list_pretrained() or a path) "
                                        "instead of training one")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.model and args.dataset == "synthetic":
        parser.error("--model scores a pretrained model on dsb2018 or isbi2012, not synthetic")
    minutes, depth, base, tile, batch = DEFAULTS[args.dataset]
    args.minutes = args.minutes or minutes
    args.depth = args.depth or depth
    args.base_channels = args.base_channels or base
    args.tile_size = args.tile_size or tile
    args.batch_size = args.batch_size or batch
    with threadpool_limits(args.threads):
        result = {"synthetic": bench_synthetic, "dsb2018": bench_dsb2018,
                  "isbi2012": bench_isbi2012}[args.dataset](args)
    result["threads"] = args.threads
    name = args.dataset + ("_plain_loss" if args.plain_loss else "")
    name += "_pretrained" if args.model else ""
    print(f"written: {write_result(name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
