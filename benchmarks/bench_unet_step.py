"""One U-Net training step on the CPU: minunet (NumPy) against PyTorch, in one process.

A step is forward + weighted softmax cross-entropy (a random weight map, as the paper's
``w(x)``) + backward + SGD (momentum 0.99), float32, from the same weights for both
libraries. The sizes:

* depth 5, base 16, one 188x188 tile, ``padding="valid"`` (the paper's layout, narrower);
* depth 4, base 32, a batch of four 128x128 tiles, ``padding="same"``;
* depth 5, base 32, a batch of four 128x128 tiles, ``padding="same"``, no BatchNorm;
* the paper's network: depth 5, base 64, one 572x572 tile, ``padding="valid"``.

The two libraries' steps alternate, and each library's median is reported with the ratio
of the medians (the machine may be busy: alternating exposes both to the same load); each
timed step follows an untimed step of the same library, as in training. Each
case also gives the convolutions' GFLOP/s next to the peak of a large float32 matrix
product (sgemm) measured in the same process with the same threads, and ``--ladder``
times minunet's step with its CPU optimisations added one at a time, and every case also
times minunet with NumPy's huge-page advice left on (:mod:`minunet.functional.process`).
Writes ``benchmarks/results/unet_step_cpu.json``, with the peak memory of one minunet step
(its arrays, with and without each layer's cache freed during backward); ``--profile`` adds
a cProfile breakdown of one minunet step (where the time goes, by function).

Usage: ``python benchmarks/bench_unet_step.py [--threads N] [--repeats R] [--cases NAME ...]
[--ladder [NAME ...]] [--profile]``
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
    parser.add_argument("--cases", nargs="+", help="names of the cases to run (default: all)")
    parser.add_argument("--ladder", nargs="*", metavar="NAME",
                        help="also time minunet with its optimisations added one by one, "
                             "for the cases named (all cases when no name follows)")
    parser.add_argument("--profile", action="store_true", help="cProfile one minunet step")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                         "unet_step_cpu.json"))
    return parser.parse_args()


ARGS = parse_args()
if ARGS.threads is not None:  # must be set before NumPy's BLAS starts its thread pool
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(ARGS.threads)

import contextlib  # noqa: E402
import cProfile  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
from bench_kernels import (  # noqa: E402
    blas_description,
    huge_page_settings,
    sgemm_peak_gflops,
)
from tqdm import tqdm  # noqa: E402

import minunet.functional  # noqa: E402
import minunet.functional.blas as blas  # noqa: E402
import minunet.functional.conv as conv_kernels  # noqa: E402
import minunet.functional.process as process  # noqa: E402
import minunet.functional.threads as threads  # noqa: E402
from minunet import UNet, losses, nn, optim  # noqa: E402
from minunet.files import write_json  # noqa: E402
from minunet.nn import Conv2d, ConvTranspose2d  # noqa: E402
from minunet.parallel import BatchSplit  # noqa: E402
from minunet.serialization import to_torch_state_dict  # noqa: E402
from minunet.torch_reference import TorchUNet  # noqa: E402

CASES = [
    dict(name="depth5_base16_1x188_valid", depth=5, base_channels=16, batch=1, size=188,
         padding="valid"),
    dict(name="depth4_base32_4x128_same", depth=4, base_channels=32, batch=4, size=128,
         padding="same"),
    dict(name="depth5_base32_4x128_same", depth=5, base_channels=32, batch=4, size=128,
         padding="same"),
    dict(name="paper_depth5_base64_1x572_valid", depth=5, base_channels=64, batch=1, size=572,
         padding="valid"),
]

# minunet's CPU optimisations as a ladder (see minunet/functional/conv.py): the plain
# im2col/col2im kernels with 64 MiB blocks first, then each optimisation added in turn; the
# last rung is minunet as it is, the batch split across threads (minunet/parallel.py), which
# the rungs before it run without. Each rung names the replacements (module, attribute) that
# switch off the optimisations not yet added.
NO_SHARES = {(threads, "blas_threads"): lambda: 1}  # kernels run serially, BLAS on its threads
NO_SHIFTED_PRODUCTS = {(conv_kernels, "_shifted_products_pay"): lambda x, geometry: False}
NUMPY_GEMM = {(blas, "_GEMM"): {}}  # each product to a temporary, then added
BRANCHING_RELU_GRADIENT = {
    (minunet.functional, "relu_backward"):
    lambda grad_out, x, out=None: np.where(x > 0, grad_out, 0).astype(grad_out.dtype)}
# every layer keeps what forward cached until the next forward (the caches freed in backward
# are the last rung)
CACHES_KEPT = {(layer, "_clear_cache"): lambda self: None
               for layer in (nn._ConvolutionLayer, nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d,
                             nn.CropConcat)}
FRESH_SCRATCH = {(conv_kernels, "SCRATCH_MAX_BYTES"): 0}  # new flat arrays at every call
# NumPy asks for huge pages for every array of 4 MiB or more, as it does outside minunet;
# timed for every case next to minunet's step (it matters where the C library does not
# keep feature maps for reuse: the paper's 572x572 tile)
HUGE_PAGES = {(process, "_HUGE_PAGE_ADVICE"): None}
LATER = {**CACHES_KEPT, **FRESH_SCRATCH, **NO_SHARES}  # the rungs after the kernels' own
BEFORE_SHIFTED = {**NO_SHIFTED_PRODUCTS, **NUMPY_GEMM, **BRANCHING_RELU_GRADIENT, **LATER}
LADDER = [
    ("im2col forward, col2im backward, one 64 MiB block",
     {**BEFORE_SHIFTED, (conv_kernels, "_gradient_geometry"): lambda geometry: None,
      (conv_kernels, "BLOCK_PIXELS"): 2**40}),
    ("+ backward from one im2col of grad_out",
     {**BEFORE_SHIFTED, (conv_kernels, "BLOCK_PIXELS"): 2**40}),
    ("+ blocks of 512 pixels and more", BEFORE_SHIFTED),
    ("+ shifted products (NumPy: each product, then a sum)",
     {**NUMPY_GEMM, **BRANCHING_RELU_GRADIENT, **LATER}),
    ("+ BLAS adds each product in place (gemm, beta = 1)",
     {**BRANCHING_RELU_GRADIENT, **LATER}),
    ("+ a branch-free ReLU gradient", LATER),
    ("+ backward frees each layer's cache once used", {**FRESH_SCRATCH, **NO_SHARES}),
    ("+ fewer passes over memory (reused buffers, gradients in place)", NO_SHARES),
    ("+ each kernel's work shared out to threads, one BLAS thread each", {}),
    ("+ the batch split across threads", {}),
]


@contextlib.contextmanager
def switched_off(replacements):
    saved = {key: getattr(*key) for key in replacements}
    for (module, name), value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def convolution_flops(net, x_shape) -> int:
    """Multiply-adds x 2 of every convolution in one training step: the forward product and
    the two backward ones (input and weight gradient) have the same count, except that the
    first layer computes no gradient for the images."""
    shape, total, first = x_shape, 0, None
    for _, layer, out_shape in net._layer_shapes(x_shape):
        if isinstance(layer, Conv2d):
            kh, kw = layer.kernel_size
            flops = 2 * math.prod(out_shape) * layer.weight.shape[1] * kh * kw
            first = flops if first is None else first
            total += flops
        elif isinstance(layer, ConvTranspose2d):
            c_in, _, kh, kw = layer.weight.shape
            total += 2 * math.prod(shape[:1] + shape[2:]) * c_in * layer.weight.shape[1] * kh * kw
        shape = out_shape
    return 3 * total - first


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
    weight = rng.uniform(0.5, 2.0, size=target.shape).astype(np.float32)
    return net, torch_net, x, target, weight


def minunet_step(net, optimizer, x, target, weight):
    optimizer.zero_grad()
    loss, grad_logits = losses.softmax_cross_entropy(net.forward(x), target, weight)
    net.backward(grad_logits, input_gradient=False)  # as PyTorch: the images need none
    optimizer.step()
    return float(loss)


def torch_step(net, optimizer, x, target, weight):
    optimizer.zero_grad()
    loss = (TF.cross_entropy(net(x), target, reduction="none") * weight).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def alternating_times(steps, repeats, label):
    """Time the steps in turn, ``repeats`` rounds after one warm-up round (allocations,
    first-call overheads); returns one list of times per step.

    Each timed step follows an untimed step of its own, as in a training loop. A step
    right after the *other* library's step pays for what that one left behind (worker
    threads still spinning, memory just handed back to the system), and not equally:
    right after the other library's step rather than its own, PyTorch's step of the
    depth-5/base-32/4x128^2 case took 17 % longer and minunet's 5 %; on the paper's
    network PyTorch's 2 % and minunet's 11 %.
    """
    for step in steps:
        step()
    times = [[] for _ in steps]
    for _ in tqdm(range(repeats), desc=label, leave=False):
        for step, step_times in zip(steps, times, strict=True):
            step()
            start = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - start)
    return times


def time_with(replacements, step):
    """``step`` that runs with some of minunet's kernels replaced."""
    def replaced():
        with switched_off(replacements):
            step()
    return replaced


def peak_memory_mb(step) -> float:
    """The most memory the arrays allocated by one call of ``step`` held at once, in MiB
    (NumPy reports its allocations to tracemalloc; PyTorch's are not counted). Measured with
    fresh flat arrays in the shifted products, so that the buffers they otherwise keep from
    an earlier call count too."""
    tracemalloc.start()
    try:
        time_with(FRESH_SCRATCH, step)()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def profile_step(step, top=12) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()




def main():
    if ARGS.threads is not None:
        torch.set_num_threads(ARGS.threads)
    threads = torch.get_num_threads()
    blas = blas_description()
    warnings = [f"{v}={os.environ[v]} is set: NumPy's OpenBLAS may not run its best kernel"
                for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    for line in warnings:
        print("warning:", line)
    peak = sgemm_peak_gflops()
    print(f"threads {threads}; NumPy BLAS {blas}; sgemm peak {peak:.0f} GFLOP/s")
    load_before = os.getloadavg()[0]
    results = []
    cases = [case for case in CASES if not ARGS.cases or case["name"] in ARGS.cases]
    for case in cases:
        net, torch_net, x, target, weight = make_case(case)
        sgd = optim.SGD(net.parameters(), lr=1e-3, momentum=0.99)
        torch_sgd = torch.optim.SGD(torch_net.parameters(), lr=1e-3, momentum=0.99)
        torch_data = [torch.from_numpy(a) for a in (x, target, weight)]
        ours_step = functools.partial(minunet_step, BatchSplit(net), sgd, x, target, weight)
        unsplit_step = functools.partial(minunet_step, net, sgd, x, target, weight)
        theirs_step = functools.partial(torch_step, torch_net, torch_sgd, *torch_data)
        steps = {"minunet": ours_step, "torch": theirs_step,
                 "huge_pages": time_with(HUGE_PAGES, ours_step)}
        ladder = ARGS.ladder is not None and (not ARGS.ladder or case["name"] in ARGS.ladder)
        if ladder:
            steps.update({name: time_with(replacements, unsplit_step)
                          for name, replacements in LADDER[:-1]})
        times = dict(zip(steps, alternating_times(list(steps.values()), ARGS.repeats,
                                                  case["name"]), strict=True))
        medians = {name: statistics.median(t) for name, t in times.items()}
        ours, theirs = medians["minunet"], medians["torch"]
        flops = convolution_flops(net, x.shape)
        print(f"{case['name']:>32}: minunet {ours * 1e3:8.1f} ms   torch {theirs * 1e3:8.1f} ms"
              f"   ratio {ours / theirs:5.2f}x   convolutions {flops / 1e9:.1f} GFLOP: "
              f"minunet {flops / ours / 1e9:.0f}, torch {flops / theirs / 1e9:.0f} GFLOP/s")
        huge = medians["huge_pages"]
        print(f"{'':>34}with NumPy's huge-page advice {huge * 1e3:8.1f} ms   ratio "
              f"{huge / theirs:5.2f}x   (minunet's steps {min(times['minunet']):.3f}-"
              f"{max(times['minunet']):.3f} s, with the advice {min(times['huge_pages']):.3f}-"
              f"{max(times['huge_pages']):.3f} s)")
        result = {**case, "minunet_s": ours, "torch_s": theirs, "ratio": ours / theirs,
                  "with_huge_pages": {"minunet_s": huge, "ratio": huge / theirs,
                                      "times_s": times["huge_pages"]},
                  "convolution_gflop": flops / 1e9,
                  "minunet_gflops": flops / ours / 1e9, "torch_gflops": flops / theirs / 1e9,
                  "minunet_times_s": times["minunet"], "torch_times_s": times["torch"]}
        result["peak_memory_mb"] = {"minunet": peak_memory_mb(ours_step),
                                    "caches_kept": peak_memory_mb(time_with(CACHES_KEPT,
                                                                            ours_step))}
        print(f"{'':>34}peak memory of a step: {result['peak_memory_mb']['minunet']:.0f} MiB,"
              f" {result['peak_memory_mb']['caches_kept']:.0f} MiB with every cache kept")
        if ladder:
            medians[LADDER[-1][0]], times[LADDER[-1][0]] = ours, times["minunet"]
            result["ladder"] = [
                {"kernels": name, "minunet_s": medians[name], "ratio": medians[name] / theirs,
                 "times_s": times[name]}
                for name, _ in LADDER
            ]
            for row in result["ladder"]:
                print(f"{'':>34}{row['kernels']:<52} {row['minunet_s'] * 1e3:8.1f} ms"
                      f"   ratio {row['ratio']:5.2f}x")
        results.append(result)
        peak = max(peak, sgemm_peak_gflops())  # a busy machine: the best of several tries
        if ARGS.profile:
            print(profile_step(ours_step))
    write_json(ARGS.output, {
        "benchmark": "one U-Net training step (forward, weighted softmax cross-entropy, "
                     "backward, SGD momentum 0.99), float32, CPU",
        "command": " ".join(["python", *sys.argv]),
        "threads": threads, "repeats": ARGS.repeats, "statistic": "median",
        "protocol": "rounds that alternate the libraries (and ladder rungs); each timed "
                    "step right after an untimed step of its own",
        "blas": blas, "warnings": warnings, "sgemm_peak_gflops": peak,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "cpu_count": os.cpu_count(), "huge_pages": huge_page_settings(),
        "numpy": np.__version__, "torch": torch.__version__,
        "python": sys.version.split()[0], "cases": results,
    })
    print(f"written {ARGS.output}")


if __name__ == "__main__":
    main()
