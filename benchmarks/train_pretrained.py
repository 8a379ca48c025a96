"""Train the networks that minunet ships as pretrained models, with minunet's own kernels.

    python benchmarks/train_pretrained.py isbi2012 [--data PATH] [--threads 2]
    python benchmarks/train_pretrained.py dsb2018  [--threads 1]

Each recipe is fixed here (network, data split, steps, optimiser, loss, seed), so that a
run is repeatable from its command alone. The trained network is written in float32 to
``runs/pretrained/<name>.npz`` with a JSON log of the run next to it; the test split is not
touched here (``bench_segmentation.py --model <name>`` scores it once, and
``ship_pretrained.py`` stores the float16 copy and model card inside the package).

* isbi2012: train on slices 0-21, choose the epoch by pixel error on slices 22-24 (all
  within the training part 0-24); slices 25-29 are the test set.
* dsb2018: train on the left half of the stardist nuclei image (columns 0-255); the right
  half is the test set. No validation split: the recipe keeps its last weights.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import minunet
from minunet.data import load_dsb2018_nuclei, load_isbi2012
from minunet.files import write_json
from minunet.train import fit

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "runs" / "pretrained"

RECIPES = {
    "isbi2012": {
        "network": {"depth": 5, "base_channels": 24, "padding": "same", "batch_norm": True},
        "fit": {"steps": 2400, "steps_per_epoch": 200, "batch_size": 4, "tile_size": 128,
                "optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine", "min_lr": 1e-5,
                "weight_maps": False, "class_weights": (1.0, 1.0), "border_width": 0,
                "elastic_std": 10.0, "keep_best": "pixel_error"},
        "split": "train: slices 0-21, validation (epoch choice): slices 22-24, "
                 "test: slices 25-29",
    },
    "dsb2018": {
        "network": {"depth": 4, "base_channels": 24, "padding": "same", "batch_norm": True},
        "fit": {"steps": 1500, "steps_per_epoch": 250, "batch_size": 4, "tile_size": 96,
                "optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine", "min_lr": 1e-5,
                "weight_maps": False, "class_weights": (1.0, 1.0), "border_width": 1,
                "elastic_std": 10.0},
        "split": "train: columns 0-255 of the stardist DSB 2018 image, test: columns 256-511",
    },
}


def isbi_data(path):
    data = load_isbi2012(path)
    train = (data.images[:22], data.labels[:22])
    val = (data.images[22:25], data.labels[22:25])
    return train, val


def dsb_data(_path):
    image, labels = load_dsb2018_nuclei()[0]
    return ([image[:, :256]], [labels[:, :256]]), None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isbi2012"),
                        help="ISBI 2012 folder (isbi2012 only)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="start from the weights of this checkpoint (a second "
                                       "stage of training) instead of a random initialisation")
    parser.add_argument("--steps", type=int, help="override the recipe's number of steps")
    parser.add_argument("--lr", type=float, help="override the recipe's learning rate")
    parser.add_argument("--stage", default="", help="suffix of the output files of this stage")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.name]
    if args.name == "isbi2012" and not Path(args.data).is_dir():
        parser.error(f"--data: ISBI 2012 folder not found at {args.data}")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    model_path = OUTPUT / f"{args.name}{args.stage}.npz"
    if not os.access(OUTPUT, os.W_OK):
        parser.error(f"output folder {OUTPUT} is not writable")
    commit = git_commit()  # the code that trains, before anything changes under the run
    train, val = (isbi_data if args.name == "isbi2012" else dsb_data)(args.data)
    net = minunet.UNet(**recipe["network"], seed=args.seed)
    if args.init:
        net.load_state_dict(minunet.load(args.init).state_dict())
    settings = dict(recipe["fit"])
    settings.update({key: value for key, value in (("steps", args.steps), ("lr", args.lr))
                     if value is not None})
    started = time.perf_counter()
    with threadpool_limits(args.threads):
        blas = [{k: info.get(k) for k in ("internal_api", "architecture", "num_threads")}
                for info in threadpool_info()]
        history = fit(net, train, val, seed=args.seed, progress=not args.quiet,
                      checkpoint_path=OUTPUT / f"{args.name}{args.stage}.checkpoint.npz",
                      **settings)
    seconds = time.perf_counter() - started
    minunet.save(net, model_path)
    log = {"name": args.name, "command": "python benchmarks/train_pretrained.py "
                                         + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "commit": commit, "seed": args.seed, "threads": args.threads, "blas": blas,
           "python": platform.python_version(), "numpy": np.__version__,
           "network": net.config, "fit": settings, "init": args.init,
           "split": recipe["split"],
           "train_seconds": round(seconds, 1), "steps_done": len(history.loss),
           "best_epoch": history.best_epoch, "epochs": history.epochs}
    log_path = OUTPUT / f"{args.name}{args.stage}.json"
    write_json(log_path, log)
    print(f"{args.name}: {len(history.loss)} steps in {seconds / 60:.1f} min, best epoch "
          f"{history.best_epoch}; written {model_path} and {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
