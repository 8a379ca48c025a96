"""Ship a network trained by ``train_pretrained.py`` as a pretrained model of the package.

    python benchmarks/ship_pretrained.py isbi2012 [--data PATH]
    python benchmarks/ship_pretrained.py dsb2018

1. Store the float32 network of ``runs/pretrained/<name>.npz`` at half precision in
   ``minunet/models/<name>.npz``, after checking that half precision changes its
   predictions by less than ``--tolerance`` (largest probability difference, on the first
   training image: the test split is left alone here).
2. Score the shipped file on the test split with ``bench_segmentation.py --model <name>``
   (which writes ``benchmarks/results/segmentation_<dataset>_pretrained.json``).
3. Write the model card, ``minunet/models/<name>.json`` and ``<name>.md``: data and split,
   the exact training command, seed, training time, commit, the recipe, the validation
   history and the test scores next to the paper's.

``--rescore`` does step 2 and refreshes the card's scores only, for a shipped model whose
metrics changed (its training run need not be at hand).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import minunet
from minunet.data import load_dsb2018_nuclei, load_isbi2012
from minunet.files import atomic_write, write_json
from minunet.metrics import best_rand_error
from minunet.zoo import MODELS

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "pretrained"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_segmentation  # noqa: E402  (a sibling script, not a package)

TASKS = {
    "isbi2012": {
        "task": "EM membrane segmentation (ISBI 2012, Drosophila ventral nerve cord, ssTEM)",
        "classes": {"0": "membrane (background)", "1": "cell interior (label 255)"},
        "input": "one gray-level channel, float in [0, 1] (8-bit images divided by 255)",
    },
    "dsb2018": {
        "task": "nucleus segmentation in fluorescence microscopy (DSB 2018, stardist's image)",
        "classes": {"0": "background", "1": "nucleus"},
        "input": "one gray-level channel, float in [0, 1] (percentile-normalised)",
    },
}


def half_precision_check(net, name: str, data_path: str) -> tuple[float, float]:
    """Largest probability change and fraction of pixels whose class changes when the
    weights are stored at half precision, on the first training image."""
    image = (load_isbi2012(data_path) if name == "isbi2012" else load_dsb2018_nuclei()).images[0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "half.npz"
        minunet.save(net, path, storage_dtype="float16")
        half = minunet.load(path)
    full_prob, half_prob = minunet.predict(net, image), minunet.predict(half, image)
    changed = np.mean(full_prob.argmax(0) != half_prob.argmax(0))
    return float(np.abs(full_prob - half_prob).max()), float(changed)


def recommended_postprocess(net, name: str, data_path: str) -> dict:
    """Post-processing settings chosen on training data only. dsb2018: the smallest cell
    kept is the smallest nucleus annotated in the training half. isbi2012: the threshold of
    the best grown-segment Rand error on the validation slices 22-24 (with and without
    test-time augmentation)."""
    if name == "dsb2018":
        labels = load_dsb2018_nuclei().labels[0][:, :256]
        areas = np.bincount(labels.ravel())[1:]
        return {"min_size": int(areas[areas > 0].min()),
                "min_size_rule": "the smallest nucleus annotated in the training half"}
    data = load_isbi2012(data_path)
    chosen = {}
    for key, tta in (("rand_threshold", False), ("rand_threshold_tta", True)):
        probabilities = [minunet.predict(net, image, tta=tta)[1]
                         for image in data.images[22:25]]
        chosen[key] = best_rand_error(probabilities, data.labels[22:25], grow=True)["threshold"]
    chosen["rule"] = "best grown-segment Rand error on validation slices 22-24"
    return chosen


def markdown_card(card: dict) -> str:
    training, scores = card["training"], card["scores"]
    lines = [f"# Model card: `{card['name']}`", "", card["task"], "",
             "| | |", "|---|---|",
             f"| classes | {'; '.join(f'{k}: {v}' for k, v in card['classes'].items())} |",
             f"| input | {card['input']} |",
             f"| network | {json.dumps(card['network'])} |",
             f"| parameters | {card['parameters']:,} (stored as float16, "
             f"{card['file_bytes'] / 2**20:.1f} MiB) |",
             f"| data and split | {training['split']} |",
             f"| command | `{training['command']}` |",
             f"| seed | {training['seed']} |",
             *([f"| first stage | `{training['previous_stage']['command']}`, "
                f"{training['previous_stage']['train_seconds'] / 60:.1f} min |"]
               if "previous_stage" in training else []),
             f"| training time | {training['train_seconds'] / 60:.1f} min on "
             f"{training['threads']} CPU thread(s), {training['steps_done']} steps |",
             f"| commit | {training['commit']} |",
             f"| recipe | {json.dumps(training['fit'])} |",
             f"| chosen epoch | {training['best_epoch']} |",
             f"| post-processing | {json.dumps(card['postprocess'])} |",
             f"| float16 storage | largest probability change {card['float16_check'][0]:.2e}, "
             f"pixels changing class {card['float16_check'][1]:.2e} |", "",
             "## Test scores", "", "```json", json.dumps(scores, indent=2), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(TASKS))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isbi2012"))
    parser.add_argument("--stage", default="",
                        help="ship the network of this training stage (train_pretrained --stage)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest probability change allowed by float16 storage")
    parser.add_argument("--rescore", action="store_true",
                        help="only score the shipped model again and refresh its card's "
                             "test scores (after a change of the metrics)")
    args = parser.parse_args(argv)
    if args.rescore:
        card = json.loads((MODELS / f"{args.name}.json").read_text())
        write_card(score_on_test_split(card, args), args.name)
        print(f"rescored {args.name}: its model card holds the new test scores")
        return 0
    source = RUNS / f"{args.name}{args.stage}.npz"
    log_path = RUNS / f"{args.name}{args.stage}.json"
    if not (source.is_file() and log_path.is_file()):
        parser.error(f"train it first: python benchmarks/train_pretrained.py {args.name}")
    if not os.access(MODELS, os.W_OK):
        parser.error(f"{MODELS} is not writable")
    net, training = minunet.load(source), json.loads(log_path.read_text())
    if training.get("init"):  # a second stage: its card also tells how the first went
        first = Path(training["init"]).with_suffix(".json")
        training["previous_stage"] = json.loads(first.read_text())
    largest, changed = half_precision_check(net, args.name, args.data)
    print(f"float16 storage: largest probability change {largest:.2e}, "
          f"pixels changing class {changed:.2e}")
    if largest > args.tolerance:
        parser.error(f"float16 storage changes probabilities by {largest:.3f} > "
                     f"--tolerance {args.tolerance}")
    target = MODELS / f"{args.name}.npz"
    minunet.save(net, target, storage_dtype="float16")
    card = {"name": args.name, **TASKS[args.name], "network": net.config,
            "parameters": int(sum(p.data.size for p in net.parameters())),
            "file_bytes": target.stat().st_size, "float16_check": [largest, changed],
            "training": {k: v for k, v in training.items() if k != "name"},
            "postprocess": recommended_postprocess(net, args.name, args.data), "scores": None}
    write_json(MODELS / f"{args.name}.json", card)
    write_card(score_on_test_split(card, args), args.name)
    print(f"shipped {target} ({card['file_bytes'] / 2**20:.1f} MiB) with its model card")
    return 0


def score_on_test_split(card: dict, args) -> dict:
    """``card`` with the scores of the shipped model on the test split
    (``bench_segmentation.py --model``)."""
    extra = ["--data", args.data] if args.name == "isbi2012" else []
    bench_segmentation.main([args.name, "--model", args.name, *extra])
    results = json.loads((bench_segmentation.RESULTS
                          / f"segmentation_{args.name}_pretrained.json").read_text())
    card["scores"] = {key: value for key, value in results.items() if key.startswith("test")}
    if args.name == "isbi2012":
        card["scores"]["paper_table1_hidden_test_set"] = bench_segmentation.PAPER_ISBI
    return card


def write_card(card: dict, name: str) -> None:
    """The model card, as JSON (read by :func:`minunet.model_card`) and as Markdown."""
    write_json(MODELS / f"{name}.json", card)
    text = markdown_card(card).encode()
    atomic_write(MODELS / f"{name}.md", lambda stream: stream.write(text))


if __name__ == "__main__":
    sys.exit(main())
