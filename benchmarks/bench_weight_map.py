"""When does the paper's weight map help? Plain loss, Eq. 2, and a three-class target,
compared on touching nuclei with the same network, steps and seeds.

    python benchmarks/bench_weight_map.py [--seeds 0 1 2] [--steps 600] [--threads 1]

Data: the DSB 2018 nuclei image shipped with stardist; train on its left half (columns
0-255), score on its right half (columns 256-511, 57 nuclei, several of them touching).

Arms (everything else equal: a depth-4, base-16 'same' U-Net with BatchNorm, Adam 1e-3 with
a cosine schedule, batch 4 of 96 px tiles, the same augmentation and seeds):

* ``plain``: unweighted cross-entropy on cell/background with 1-px separation lines cut
  between touching nuclei;
* ``eq2``: the same targets with the paper's Eq. 2 weights (balanced classes, w0 = 10,
  sigma = 5 px), which make the separation lines expensive to miss;
* ``three_class``: background / interior / boundary (a 2-px band inside every nucleus),
  balanced class weights, instances grown from the interiors over the boundary band.

Scores on the test half, for what Eq. 2 is for: object F1 at IoU 0.5, merges (a predicted
object holding most of two or more true nuclei) and splits, the count error, and pixel IoU.
Two-class networks are scored on the connected components of their mask (what the loss
alone separates) and after the watershed split of :func:`minunet.postprocess.label_instances`.
Writes ``benchmarks/results/weight_map_study.json`` with every run and the mean and standard
deviation over seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import minunet
from minunet.data import boundary_classes, load_dsb2018_nuclei
from minunet.files import write_json
from minunet.inference import predict
from minunet.metrics import count_objects, iou, merges_and_splits, object_scores
from minunet.postprocess import label_boundary_classes, label_instances
from minunet.train import fit

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {
    "plain": {"num_classes": 2, "weight_maps": False, "class_weights": (1.0, 1.0)},
    "eq2": {"num_classes": 2, "weight_maps": True, "class_weights": "balanced",
            "w0": 10.0, "sigma": 5.0},
    "three_class": {"num_classes": 3, "weight_maps": False, "class_weights": "balanced"},
}
NETWORK = {"depth": 4, "base_channels": 16, "padding": "same", "batch_norm": True}


def scores(found, truth) -> dict:
    objects = object_scores(found, truth)
    true_count = count_objects(truth)
    return {"f1": objects.f1, **merges_and_splits(found, truth),
            "count_error": abs(count_objects(found) - true_count) / true_count,
            "iou": iou(found, truth)}


def run_arm(arm: str, seed: int, steps: int, image, labels, test_image, test_labels) -> dict:
    settings = dict(ARMS[arm])
    num_classes = settings.pop("num_classes")
    target = boundary_classes(labels, width=2) if num_classes == 3 else labels
    net = minunet.UNet(**NETWORK, num_classes=num_classes, seed=seed)
    started = time.perf_counter()
    fit(net, ([image], [target]), steps=steps, batch_size=4, tile_size=96, optimizer="adam",
        lr=1e-3, lr_schedule="cosine", min_lr=1e-5, seed=seed, progress=False, **settings)
    seconds = time.perf_counter() - started
    prob = predict(net, test_image)
    if num_classes == 3:
        results = {"instances": scores(label_boundary_classes(prob), test_labels)}
    else:
        results = {
            "components": scores(label_instances(prob, separate=False), test_labels),
            "watershed": scores(label_instances(prob), test_labels),
        }
    return {"arm": arm, "seed": seed, "train_seconds": round(seconds, 1), **results}


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every score, per arm and post-processing."""
    summary = {}
    for arm in ARMS:
        mine = [run for run in runs if run["arm"] == arm]
        for post in ("components", "watershed", "instances"):
            rows = [run[post] for run in mine if post in run]
            if not rows:
                continue
            summary[f"{arm}/{post}"] = {
                key: {"mean": float(np.mean([r[key] for r in rows])),
                      "std": float(np.std([r[key] for r in rows], ddof=1))
                      if len(rows) > 1 else 0.0}
                for key in rows[0]}
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = RESULTS / "weight_map_study.json"
    if not os.access(RESULTS, os.W_OK):
        parser.error(f"results folder {RESULTS} is not writable")
    image, labels = load_dsb2018_nuclei()[0]
    train = (image[:, :256], labels[:, :256])
    test = (image[:, 256:], labels[:, 256:])
    runs = []
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with threadpool_limits(args.threads):
        for arm, seed in tqdm(jobs, desc="runs"):
            runs.append(run_arm(arm, seed, args.steps, *train, *test))
            tqdm.write(json.dumps(runs[-1]))
    payload = {"benchmark": "weight_map_study",
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": "python benchmarks/bench_weight_map.py "
                          + " ".join(argv if argv is not None else sys.argv[1:]),
               "python": platform.python_version(), "numpy": np.__version__,
               "threads": args.threads, "network": NETWORK, "arms": ARMS,
               "steps": args.steps, "seeds": args.seeds,
               "data": "DSB 2018 nuclei (stardist): train columns 0-255, test columns 256-511",
               "true_count": count_objects(test[1]), "runs": runs, "summary": summarise(runs)}
    write_json(output, payload)
    for name, row in payload["summary"].items():
        print(f"{name:26s} " + "  ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}"
                                          for k, v in row.items()))
    print(f"written: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
