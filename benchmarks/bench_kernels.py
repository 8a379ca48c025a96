"""Time minunet's fast NumPy kernels against torch.nn.functional on the CPU.

Every distinct convolution, up-convolution and max-pool of a U-Net is timed, forward and
backward (all input, weight and bias gradients), in float32, with the same number of threads
for NumPy's BLAS and for PyTorch, in one process. The U-Nets: the paper's (valid padding,
one 572x572 tile), a small one, and depth 5 with 32 base channels on a batch of four 128x128
tiles with same padding. Each number is the median of at least ``--repeats`` runs. The table gives
``minunet / torch`` ratios; the results go to ``benchmarks/results/kernels_cpu.json``, with
the OpenBLAS kernel that ran (threadpoolctl) and the GFLOP/s of a large float32 matrix
product (sgemm), the practical peak of this machine for the convolutions. For every
convolution it also times the layer's three matrix products alone (``blas_ms``): the same
multiply-adds as one BLAS call each, with no copies around them, in the fastest of the ways
minunet can phrase them: how long NumPy's BLAS itself takes for the layer's arithmetic.
Where the batch holds several images, each layer is also timed as training runs it
(``split``: :class:`minunet.parallel.BatchSplit` gives each thread a share of the images,
and each share's kernels run on one thread), against PyTorch on the whole batch. minunet's
kernels run as the U-Net's passes run them, without NumPy's huge-page advice.

    python benchmarks/bench_kernels.py                       # all U-Nets
    python benchmarks/bench_kernels.py --configs small --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import minunet
import minunet.functional as mf
from minunet.files import write_json
from minunet.functional.blas import blas_threads, gemm
from minunet.functional.process import without_huge_pages
from minunet.functional.threads import run_at_once, split
from minunet.shapes import unet_output_size

CONFIGS = {  # name: (input edge, depth, base channels, batch, padding)
    "paper": (572, 5, 64, 1, "valid"),  # Ronneberger et al. (2015), Fig. 1
    "small": (188, 5, 16, 1, "valid"),
    "same_batch4": (128, 5, 32, 4, "same"),
}
RESULTS = Path(__file__).parent / "results" / "kernels_cpu.json"
OUTLIER_RATIO, RETRIES = 3.0, 2  # layers timed outside [1/3, 3] x torch are timed again
SLOW_OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def unet_layers(size, depth, base, batch=1, padding="valid", in_channels=1, classes=2):
    """The kernels of a U-Net in forward order:
    ``(name, kind, input shape, weight shape or None, kwargs)``."""
    layers, channels = [], in_channels
    conv = {"padding": padding}
    shrink = 2 if padding == "valid" else 0  # per 3x3 convolution
    for level in range(1, depth + 1):  # contracting path and bottom
        width = base * 2 ** (level - 1)
        for k in (1, 2):
            layers.append((f"down{level} conv3x3 #{k}", "conv", (batch, channels, size, size),
                           (width, channels, 3, 3), conv))
            channels, size = width, size - shrink
        if level < depth:
            layers.append((f"down{level} maxpool2x2", "pool", (batch, channels, size, size),
                           None, {"kernel_size": 2}))
            size //= 2
    for level in range(depth - 1, 0, -1):  # expanding path
        width = base * 2 ** (level - 1)
        layers.append((f"up{level} upconv2x2", "upconv", (batch, channels, size, size),
                       (channels, width, 2, 2), {"stride": 2}))
        channels, size = 2 * width, 2 * size  # concatenated with the cropped skip connection
        for k in (1, 2):
            layers.append((f"up{level} conv3x3 #{k}", "conv", (batch, channels, size, size),
                           (width, channels, 3, 3), conv))
            channels, size = width, size - shrink
    layers.append(("final conv1x1", "conv", (batch, channels, size, size),
                   (classes, channels, 1, 1), {}))
    return layers, size


def layer_gflop(kind, x_shape, weight_shape, padding) -> float | None:
    """GFLOP of one forward pass of a convolution (2 x multiply-adds); the backward pass
    does twice as many (input and weight gradients). None for a max-pool."""
    if weight_shape is None:
        return None
    n, _, h, w = x_shape
    if kind == "upconv":  # every input pixel meets every weight once
        return 2 * n * h * w * math.prod(weight_shape) / 1e9
    c_out, c_in, kh, kw = weight_shape
    if padding != "same":  # stride 1, no padding
        h, w = h - kh + 1, w - kw + 1
    return 2 * n * h * w * c_out * c_in * kh * kw / 1e9


def sgemm_peak_gflops(size=2048, repeats=5) -> float:
    """GFLOP/s of the best of ``repeats`` float32 (size x size) @ (size x size) products."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = np.empty_like(a)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


FLOOR_PIXELS = 2**16  # products over more pixels are timed on this many and scaled


def product_shapes(kind, x_shape, weight_shape, padding):
    """The three matrix products of a convolution's training step, as ``(M, K, N)`` with
    N or K the pixels: forward, input gradient, weight gradient; each a list of the
    alternative shapes that do the same multiply-adds."""
    n, c_in, h, w = x_shape
    if kind == "upconv":  # weight (C_in, C_out, kH, kW); one product per input pixel
        taps = math.prod(weight_shape[1:])
        pixels = n * h * w
        return [[(taps, c_in, pixels)], [(c_in, taps, pixels)], [(c_in, pixels, taps)]]
    c_out, _, kh, kw = weight_shape
    if padding != "same":
        h, w = h - kh + 1, w - kw + 1
    pixels, k = n * h * w, c_in * kh * kw
    return [[(c_out, k, pixels)],
            [(k, c_out, pixels), (c_in, c_out * kh * kw, pixels)],  # col2im or flipped kernel
            [(c_out, pixels, k), (c_out * kh * kw, pixels, c_in)]]  # plain or flipped


def product_ms(m, k, n, repeats, rng) -> float:
    """Milliseconds of the best of ``repeats`` products (M, K) @ (K, N) and of their
    transposes (N, K) @ (K, M), operands and output allocated beforehand. A dimension of
    more than FLOOR_PIXELS (the pixels) is cut to that and the time scaled up."""
    scale = max(m, k, n) / FLOOR_PIXELS if max(m, k, n) > FLOOR_PIXELS else 1.0
    m, k, n = (min(d, FLOOR_PIXELS) for d in (m, k, n))
    best = float("inf")
    for rows, inner, cols in ((m, k, n), (n, k, m)):
        a = rng.standard_normal((rows, inner), dtype=np.float32)
        b = rng.standard_normal((inner, cols), dtype=np.float32)
        out = np.empty((rows, cols), dtype=np.float32)
        gemm(a, b, out)
        for _ in range(repeats):
            start = time.perf_counter()
            gemm(a, b, out)
            best = min(best, time.perf_counter() - start)
    return 1e3 * best * scale


def blas_floor_ms(kind, x_shape, weight_shape, padding, repeats, rng) -> float | None:
    """A convolution's forward + backward as its three matrix products alone, each one BLAS
    call (None for a max-pool). Not a strict bound: minunet's kernels may split a product
    (the shifted products make nine), which can run faster or slower than one call."""
    if weight_shape is None:
        return None
    return sum(min(product_ms(*shape, repeats, rng) for shape in alternatives)
               for alternatives in product_shapes(kind, x_shape, weight_shape, padding))


OURS = {
    "conv": (mf.conv2d, mf.conv2d_backward),
    "upconv": (mf.conv_transpose2d, mf.conv_transpose2d_backward),
}
THEIRS = {"conv": F.conv2d, "upconv": F.conv_transpose2d, "pool": F.max_pool2d}


def timed_calls(functions, repeats, min_seconds=0.25, max_calls=100, passes=2):
    """Wall-clock times of calls of each function in milliseconds (one list per function).

    Each function runs in a block of consecutive calls (one warm-up, then at least
    ``repeats`` and more, up to ``max_calls``, until ``min_seconds`` have passed): a block
    keeps one library's worker threads busy, so that they do not compete with the other
    library's threads, which may still be spinning after their own call. The blocks repeat
    ``passes`` times in turn, so that a busy spell of the machine does not hit only one.
    """
    times = [[] for _ in functions]
    for _ in range(passes):
        for function, function_times in zip(functions, times, strict=True):
            function()
            started, calls = time.perf_counter(), 0
            while calls < repeats or (
                calls < max_calls and time.perf_counter() - started < min_seconds
            ):
                start = time.perf_counter()
                function()
                function_times.append(1e3 * (time.perf_counter() - start))
                calls += 1
    return times


def minunet_calls(kind, x, weight, bias, kwargs):
    """(forward, backward) closures of minunet's kernels; the pool saves its indices.

    Each call runs as the U-Net's passes run every kernel, without NumPy's huge-page advice
    (:func:`~minunet.functional.process.without_huge_pages`): with it, a layer's fresh
    output could wait for Linux to compact memory (the paper's top 64-channel layer, forward:
    444 ms in one run against 132 ms in the others), a stall the U-Net never sees."""
    if kind == "pool":
        out, indices = mf.max_pool2d(x, return_indices=True, **kwargs)
        grad_out = np.ones_like(out)
        calls = (lambda: mf.max_pool2d(x, return_indices=True, **kwargs),
                 lambda: mf.max_pool2d_backward(grad_out, x, indices=indices, **kwargs))
    else:
        op, op_backward = OURS[kind]
        grad_out = np.ones_like(op(x, weight, bias, **kwargs))
        calls = (lambda: op(x, weight, bias, **kwargs),
                 lambda: op_backward(grad_out, x, weight, **kwargs))
    return tuple(without_huge_pages()(call) for call in calls)


def split_calls(kind, x, weight, bias, kwargs):
    """(forward, backward) closures of minunet's kernels as training runs them on a batch
    (:class:`minunet.parallel.BatchSplit`): a share of the images on each BLAS thread, each
    share's kernels on one thread; None for a single image (training runs it unsplit)."""
    shares = split(x.shape[0], blas_threads())
    if len(shares) < 2:
        return None
    calls = [minunet_calls(kind, x[share], weight, bias, kwargs) for share in shares]
    return (lambda: run_at_once(forward for forward, _ in calls),
            lambda: run_at_once(backward for _, backward in calls))


def torch_calls(kind, x, weight, bias, kwargs):
    """(forward, backward) closures of torch.nn.functional with autograd, on the same data."""
    inputs = [torch.from_numpy(a).requires_grad_() for a in (x, weight, bias) if a is not None]
    op = THEIRS[kind]
    out = op(*inputs, **kwargs)
    grad_out = torch.ones_like(out)
    return (lambda: op(*inputs, **kwargs),
            lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True))


def blas_description():
    """Which BLAS NumPy calls, with the kernel (OpenBLAS's core type) it chose, from
    threadpoolctl; None when threadpoolctl is missing."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{key: pool.get(key) for key in ("internal_api", "version", "architecture",
                                             "num_threads")}
            for pool in threadpool_info() if pool["user_api"] == "blas"]


def huge_page_settings() -> dict:
    """NumPy's huge-page advice outside minunet's passes, and Linux's transparent huge
    pages (the bracketed word of each file is the mode in force)."""
    settings = {"numpy_advice": bool(np._core.multiarray._get_madvise_hugepage())}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as file:
                settings[f"linux_{name}"] = file.read().strip()
        except OSError:
            settings[f"linux_{name}"] = None
    return settings


def equalise_threads(threads=None):
    """Give PyTorch as many threads as NumPy's BLAS has (both ``threads`` if given);
    return the (blas, torch) thread counts."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        print("threadpoolctl is not installed: BLAS threads unknown, PyTorch keeps its default")
        if threads:
            torch.set_num_threads(threads)
        return None, torch.get_num_threads()
    if threads:
        threadpool_limits(threads, user_api="blas")
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    if blas:
        torch.set_num_threads(blas[0])
    return (blas[0] if blas else None), torch.get_num_threads()


def run_config(name, repeats, rng):
    size, depth, base, batch, padding = CONFIGS[name]
    layers, out_size = unet_layers(size, depth, base, batch, padding)
    assert out_size == unet_output_size(size, depth, padding=padding), (
        "layer list disagrees with minunet.shapes")
    rows = []
    for layer, kind, x_shape, w_shape, kwargs in tqdm(layers, desc=name, leave=False):
        x = rng.standard_normal(x_shape, dtype=np.float32)
        weight = None if w_shape is None else rng.standard_normal(w_shape, dtype=np.float32)
        bias = None
        if w_shape is not None:
            bias = rng.standard_normal(w_shape[1] if kind == "upconv" else w_shape[0],
                                       dtype=np.float32)
        calls = [*minunet_calls(kind, x, weight, bias, kwargs),
                 *torch_calls(kind, x, weight, bias, kwargs)]
        split_pair = split_calls(kind, x, weight, bias, kwargs)
        samples = timed_calls(calls, repeats)
        ms = [statistics.median(s) for s in samples]
        for _ in range(RETRIES):  # a far-off ratio is more often a busy spell than a result
            if 1 / OUTLIER_RATIO < sum(ms[:2]) / sum(ms[2:]) < OUTLIER_RATIO:
                break
            for old, new in zip(samples, timed_calls(calls, repeats), strict=True):
                old.extend(new)
            ms = [statistics.median(s) for s in samples]
        ours, theirs = ms[:2], ms[2:]
        split_ms = None
        if split_pair is not None:  # timed after the others: its blocks alternate with torch's
            split_samples = timed_calls([*split_pair, *calls[2:]], repeats)
            split_ms = [statistics.median(s) for s in split_samples[:2]]
            theirs = [statistics.median(a + b) for a, b in zip(samples[2:], split_samples[2:],
                                                               strict=True)]
        rows.append({
            "layer": layer, "x_shape": list(x_shape),
            "weight_shape": None if w_shape is None else list(w_shape),
            "padding": kwargs.get("padding", "valid"),
            "forward_gflop": layer_gflop(kind, x_shape, w_shape, kwargs.get("padding")),
            "minunet_forward_ms": ours[0], "torch_forward_ms": theirs[0],
            "minunet_backward_ms": ours[1], "torch_backward_ms": theirs[1],
            "ratio": sum(ours) / sum(theirs),
            "minunet_split_forward_ms": None if split_ms is None else split_ms[0],
            "minunet_split_backward_ms": None if split_ms is None else split_ms[1],
            "split_ratio": None if split_ms is None else sum(split_ms) / sum(theirs),
            "blas_ms": blas_floor_ms(kind, x_shape, w_shape, kwargs.get("padding"), repeats,
                                     rng),
        })
    return rows


def print_table(name, rows):
    print(f"\n{name}: {CONFIGS[name]} (input edge, depth, base channels, batch, padding), "
          "float32")
    header = (f"{'layer':<20} {'input':>18} {'fwd ms':>9} {'torch':>9} {'bwd ms':>9} "
              f"{'torch':>9} {'ratio':>6} {'blas':>7} {'split':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = "x".join(str(v) for v in r["x_shape"][1:])
        flag = "  > 3x" if r["ratio"] > 3 else ""
        floor = "" if r.get("blas_ms") is None else f"{r['blas_ms']:7.1f}"
        split_ratio = "" if r.get("split_ratio") is None else f"{r['split_ratio']:6.2f}"
        print(f"{r['layer']:<20} {shape:>18} {r['minunet_forward_ms']:9.1f} "
              f"{r['torch_forward_ms']:9.1f} {r['minunet_backward_ms']:9.1f} "
              f"{r['torch_backward_ms']:9.1f} {r['ratio']:6.2f} {floor:>7} {split_ratio:>6}"
              f"{flag}")
    ours = sum(r["minunet_forward_ms"] + r["minunet_backward_ms"] for r in rows)
    theirs = sum(r["torch_forward_ms"] + r["torch_backward_ms"] for r in rows)
    floor = sum(r["blas_ms"] for r in rows if r.get("blas_ms") is not None)
    print(f"{'all layers':<20} {'':>18} {ours:>39.1f} ms vs {theirs:.1f} ms, "
          f"ratio {ours / theirs:.2f}; the convolutions' products alone {floor:.1f} ms")
    if all(r.get("split_ratio") is not None for r in rows):
        split_ms = sum(r["minunet_split_forward_ms"] + r["minunet_split_backward_ms"]
                       for r in rows)
        print(f"{'':<20} {'':>18} as training runs them (the batch split across the "
              f"threads): {split_ms:.1f} ms, ratio {split_ms / theirs:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="at least this many runs")
    parser.add_argument("--threads", type=int, help="threads for both (default: BLAS's own)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    warnings = [f"{v}={os.environ[v]} is set: it forces OpenBLAS's kernel choice (a "
                "restricted core type or cache size), so NumPy may not run its best kernel "
                "for this CPU; benchmark with it unset"
                for v in SLOW_OPENBLAS_VARIABLES if v in os.environ]
    for line in warnings:
        print("warning:", line)
    blas_threads, torch_threads = equalise_threads(args.threads)
    blas = blas_description()
    peak = sgemm_peak_gflops()
    print(f"threads: NumPy BLAS {blas_threads}, PyTorch {torch_threads}")
    print(f"NumPy's BLAS: {blas}; sgemm peak {peak:.0f} GFLOP/s")
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_before:.1f} on {os.cpu_count()} CPUs: other "
              "processes are running, timings will be noisy")

    rng = np.random.default_rng(0)
    results = {name: run_config(name, args.repeats, rng) for name in args.configs}
    for name, rows in results.items():
        print_table(name, rows)
    peak = max(peak, sgemm_peak_gflops())  # a busy machine: the best of two tries
    print(f"sgemm peak {peak:.0f} GFLOP/s")

    write_json(args.output, {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "torch": torch.__version__, "minunet": minunet.__version__
                     if hasattr(minunet, "__version__") else None},
        "command": " ".join(["python", *sys.argv]),
        "threads": {"numpy_blas": blas_threads, "torch": torch_threads},
        "blas": blas,
        "sgemm_peak_gflops": peak,
        "huge_pages": {**huge_page_settings(), "numpy_advice_in_minunet_calls": False},
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "warnings": warnings,
        "repeats": args.repeats,
        "dtype": "float32",
        "statistic": "median",
        "configs": {name: {"input_edge_depth_base": CONFIGS[name][:3],
                           "batch": CONFIGS[name][3], "padding": CONFIGS[name][4],
                           "layers": rows}
                    for name, rows in results.items()},
    })
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
