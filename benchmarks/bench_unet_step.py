"""One U-Net training step on the CPU: minunet (NumPy) against PyTorch, in one process.

A step is forward + softmax cross-entropy + backward + SGD (momentum 0.99), float32, from the
same weights for both libraries. Two sizes:

* depth 5, base 16, one 188x188 tile, ``padding="valid"`` (the paper's layout, narrower);
* depth 4, base 32, a batch of four 128x128 tiles, ``padding="same"``.

Prints the median time of each library and their ratio, and writes
``benchmarks/results/unet_step_cpu.json``. ``--profile`` adds a cProfile breakdown of one
minunet step (where the time goes, by function).

Usage: ``python benchmarks/bench_unet_step.py [--threads N] [--repeats R] [--profile]``
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both libraries (default: PyTorch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case")
    parser.add_argument("--profile", action="store_true", help="cProfile one minunet step")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                         "unet_step_cpu.json"))
    return parser.parse_args()


ARGS = parse_args()
if ARGS.threads is not None:  # must be set before NumPy's BLAS starts its thread pool
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(ARGS.threads)

import cProfile  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
from tqdm import tqdm  # noqa: E402

from minunet import UNet, losses, optim  # noqa: E402
from minunet.serialization import to_torch_state_dict  # noqa: E402
from minunet.torch_reference import TorchUNet  # noqa: E402

CASES = [
    dict(name="depth5_base16_1x188_valid", depth=5, base_channels=16, batch=1, size=188,
         padding="valid"),
    dict(name="depth4_base32_4x128_same", depth=4, base_channels=32, batch=4, size=128,
         padding="same"),
]


def make_case(case, seed=0):
    """Both networks with equal weights, their optimisers, and one batch."""
    config = dict(depth=case["depth"], base_channels=case["base_channels"],
                  padding=case["padding"])
    net = UNet(**config, seed=seed)
    torch_net = TorchUNet(**config)
    torch_net.load_state_dict(to_torch_state_dict(net))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case["batch"], 1, case["size"], case["size"])).astype(np.float32)
    out = net.output_size(case["size"])
    target = rng.integers(0, 2, size=(case["batch"], out, out))
    return net, torch_net, x, target


def minunet_step(net, optimizer, x, target):
    optimizer.zero_grad()
    loss, grad_logits = losses.softmax_cross_entropy(net.forward(x), target)
    net.backward(grad_logits)
    optimizer.step()
    return float(loss)


def torch_step(net, optimizer, x, target):
    optimizer.zero_grad()
    loss = TF.cross_entropy(net(x), target)
    loss.backward()
    optimizer.step()
    return loss.item()


def median_time(step, repeats, label):
    step()  # warm-up (allocations, first-call overheads)
    times = []
    for _ in tqdm(range(repeats), desc=label, leave=False):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def profile_step(step, top=12) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()


def write_json_atomically(data, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json")
    with os.fdopen(handle, "w") as stream:
        json.dump(data, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, path)


def main():
    if ARGS.threads is not None:
        torch.set_num_threads(ARGS.threads)
    threads = torch.get_num_threads()
    results = []
    for case in CASES:
        net, torch_net, x, target = make_case(case)
        sgd = optim.SGD(net.parameters(), lr=1e-3, momentum=0.99)
        torch_sgd = torch.optim.SGD(torch_net.parameters(), lr=1e-3, momentum=0.99)
        x_t, target_t = torch.from_numpy(x), torch.from_numpy(target)
        ours_step = functools.partial(minunet_step, net, sgd, x, target)
        theirs_step = functools.partial(torch_step, torch_net, torch_sgd, x_t, target_t)
        ours, ours_times = median_time(ours_step, ARGS.repeats, f"minunet {case['name']}")
        theirs, theirs_times = median_time(theirs_step, ARGS.repeats, f"torch   {case['name']}")
        ratio = ours / theirs
        print(f"{case['name']:>28}: minunet {ours * 1e3:8.1f} ms   torch {theirs * 1e3:8.1f} ms"
              f"   ratio {ratio:5.2f}x")
        results.append({**case, "minunet_s": ours, "torch_s": theirs, "ratio": ratio,
                        "minunet_times_s": ours_times, "torch_times_s": theirs_times})
        if ARGS.profile:
            print(profile_step(ours_step))
    write_json_atomically({
        "benchmark": "one U-Net training step (forward, softmax cross-entropy, backward, "
                     "SGD momentum 0.99), float32, CPU",
        "threads": threads, "repeats": ARGS.repeats, "statistic": "median",
        "numpy": np.__version__, "torch": torch.__version__,
        "python": sys.version.split()[0], "cases": results,
    }, ARGS.output)
    print(f"written {ARGS.output}")


if __name__ == "__main__":
    main()
