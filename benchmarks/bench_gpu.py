"""Time minunet's CUDA kernels, rung by rung, against cuDNN, and a U-Net training step
against PyTorch, on the same GPU.

* ladder: for every convolution and up-convolution of two U-Nets -- the paper's (depth 5,
  64 base channels, 'valid', one 572x572 tile) and a 'same' one (batch 16, 256x256) -- the
  GFLOP/s of each pass (forward, input gradient, weight gradient) for every rung of
  ``minunet/cuda/conv2d.cu`` (naive, tiled, blocked, pipelined), next to cuDNN in float32
  (TF32 off) and cuDNN with its default TF32 tensor cores. The summary gives, per pass, the
  geometric mean over the paper U-Net's 3x3 convolutions of each rung's speed as a fraction
  of cuDNN float32.
* kernels: max-pool, ReLU, the weighted loss and the optimiser updates against PyTorch.
* training step (forward, loss, backward, SGD update, all on minunet's CUDA kernels) against
  PyTorch + cuDNN float32, for the same two networks.

Every kernel file is compiled (NVRTC, through CuPy) before anything is timed, and every
callable is called once before its timing. A time is the best over ``--repeats`` runs of a
loop of calls long enough to be measured (>= 20 ms), bracketed by device synchronisations;
a call slower than the budget is timed once. Results go to ``benchmarks/results/gpu.json``
with the device, driver, library versions and date, rewritten after every measurement.

    python benchmarks/bench_gpu.py                        # everything, ~5 minutes on an H200
    python benchmarks/bench_gpu.py --sections ladder --quick --output /tmp/gpu.json

Needs CuPy, PyTorch with CUDA, and an NVIDIA GPU; says so and exits otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from minunet.files import write_json

RESULTS = Path(__file__).parent / "results" / "gpu.json"
RUNGS = ("naive", "tiled", "blocked", "pipelined")  # minunet.cuda.ops.ALGORITHMS
BASELINES = ("cudnn_fp32", "cudnn_tf32")
CONV_PASSES = ("forward", "input_grad", "weight_grad")
UPCONV_PASSES = ("forward", "backward")  # the backward of an up-convolution: all gradients
NETWORKS = {  # name: (input size, batch, padding); depth 5 and 64 base channels for both
    "paper": (572, 1, "valid"),
    "same": (256, 16, "same"),
}
QUICK_NETWORKS = {"paper": (188, 1, "valid"), "same": (128, 4, "same")}
MIN_LOOP_S = 0.02  # a timed loop of calls lasts at least this long


# --- What is timed (no GPU needed) ------------------------------------------------------------


def unet_layers(size: int, batch: int, padding: str, depth: int = 5, base: int = 64):
    """The convolutions and up-convolutions of a U-Net, in order, as dicts with the letters of
    conv2d.cu: N, C, H, W (input), K, R, S (weight), P, Q (output), pad, and ``kind`` "conv"
    or "upconv" (whose weight is (C, K, 2, 2) and output (N, K, 2H, 2W))."""
    from minunet import UNet

    net = UNet(depth=depth, base_channels=base, padding=padding)
    shape, layers = (batch, 1, size, size), []
    for row in net.summary_table(size).rows:
        out = (batch, *row["output_shape"][1:])
        if row["type"] in ("Conv2d", "ConvTranspose2d"):
            (_, C, H, W), (_, K, P, Q) = shape, out  # the letters of conv2d.cu
            taps = (row["params"] - K) // (K * C)  # R * S, the weights without the biases
            R = math.isqrt(taps)
            kind = "conv" if row["type"] == "Conv2d" else "upconv"
            pad = (P - H + R - 1) // 2 if kind == "conv" else 0
            layers.append(dict(name=row["layer"], kind=kind, N=batch, C=C, H=H, W=W, K=K, R=R,
                               S=R, P=P, Q=Q, pad=pad))
        shape = out
    return layers


def pass_flop(layer) -> float:
    """Floating-point operations (2 per multiply-add) of one pass of ``layer``; the
    up-convolution's backward counts its two gradients."""
    macs = layer["N"] * layer["K"] * layer["P"] * layer["Q"] * layer["C"] * layer["R"] * \
        layer["S"]
    if layer["kind"] == "upconv":  # each output pixel meets one tap per input channel
        macs //= 4
    return 2.0 * macs


def geometric_mean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def ladder_summary(rows, network="paper"):
    """Per pass, the geometric mean over ``network``'s 3x3 convolutions of each rung's
    GFLOP/s as a fraction of cuDNN float32 (the targets of the ladder)."""
    summary = {}
    for pass_name in CONV_PASSES:
        chosen = [r for r in rows if r["network"] == network and r["kind"] == "conv"
                  and r["R"] == 3 and r["pass"] == pass_name]
        summary[pass_name] = {
            name: geometric_mean(
                r["gflops"].get(name) / r["gflops"]["cudnn_fp32"] for r in chosen
                if r["gflops"].get(name) and r["gflops"].get("cudnn_fp32"))
            for name in (*RUNGS, "cudnn_tf32")}
    return summary




# --- On the GPU -------------------------------------------------------------------------------


def check_gpu():
    """CuPy and torch modules, or a clear message and exit status 1."""
    from minunet.backend import gpu_available

    if not gpu_available():
        sys.exit("bench_gpu.py needs CuPy (pip install -r requirements-gpu.txt) and an NVIDIA "
                 "GPU; none is usable here, so there is nothing to time.")
    import cupy as cp
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py compares against PyTorch on the GPU, but this PyTorch has no "
                 "CUDA support (install a CUDA build of torch).")
    set_tf32(torch, False)
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm per shape
    return cp, torch


def set_tf32(torch, allowed: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def compile_every_kernel() -> None:
    """NVRTC-compile every kernel file for float32 now, so that no timing includes it."""
    from minunet import cuda
    from minunet.cuda import ops

    for file in cuda.KERNEL_FILES:
        module = ops._cupy_module(file, "float32")
        for name in cuda.kernel_names(file):
            module.get_function(name)


def best_time(function, synchronize, repeats=3, budget_s=1.0):
    """Best time of one call in milliseconds. One untimed call first (cuDNN's autotuning,
    memory pools); then ``repeats`` loops of enough calls to last MIN_LOOP_S. A call slower
    than ``budget_s`` is timed once."""
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    first = time.perf_counter() - start
    if first > budget_s:
        return 1e3 * first
    calls = max(1, math.ceil(MIN_LOOP_S / max(first, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            function()
        synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def ladder_callables(cp, torch, layer, with_naive: bool):
    """``{pass: {rung or baseline: callable}}`` for one layer (arrays made once, here)."""
    from minunet.cuda import ops

    aten = torch.ops.aten
    rng = np.random.default_rng(0)

    def pair(shape):
        a = rng.standard_normal(shape, dtype=np.float32)
        return cp.asarray(a), torch.from_numpy(a).cuda()

    N, C, H, W, K, R, S, P, Q = (layer[k] for k in "NCHWKRSPQ")
    pad = layer["pad"]
    rungs = RUNGS if with_naive else RUNGS[1:]
    if layer["kind"] == "upconv":
        (x, tx), (w, tw), (b, tb) = pair((N, C, H, W)), pair((C, K, 2, 2)), pair((K,))
        (g, tg) = pair((N, K, P, Q))
        ours = {"forward": lambda a: ops.conv_transpose2d(x, w, b, stride=2, algorithm=a),
                "backward": lambda a: ops.conv_transpose2d_backward(g, x, w, stride=2,
                                                                    algorithm=a)}
        theirs = {"forward": lambda: torch.nn.functional.conv_transpose2d(tx, tw, tb, stride=2),
                  "backward": lambda: aten.convolution_backward(
                      tg, tx, tw, [K], [2, 2], [0, 0], [1, 1], True, [0, 0], 1,
                      [True, True, True])}
    else:
        (x, tx), (w, tw), (b, tb) = pair((N, C, H, W)), pair((K, C, R, S)), pair((K,))
        (g, tg) = pair((N, K, P, Q))
        run = ops.gpu_runner()
        sizes = ops.ConvSizes(N, C, H, W, K, R, S, P, Q, 1, 1, pad, pad, 1, 1)
        no_bias = cp.zeros((C,), np.float32)
        grad_x, grad_w = cp.empty_like(x), cp.empty_like(w)
        # the passes one at a time, through the launcher that conv2d_backward calls twice
        ours = {"forward": lambda a: ops.conv2d(x, w, b, padding=pad, algorithm=a),
                "input_grad": lambda a: ops._conv_pass(run, "input_grad", a, sizes,
                                                       (g, w, no_bias), grad_x),
                "weight_grad": lambda a: ops._conv_pass(run, "weight_grad", a, sizes, (g, x),
                                                        grad_w)}

        def cudnn_backward(mask):
            return lambda: aten.convolution_backward(tg, tx, tw, None, [1, 1], [pad, pad],
                                                     [1, 1], False, [0, 0], 1, mask)

        theirs = {"forward": lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=pad),
                  "input_grad": cudnn_backward([True, False, False]),
                  "weight_grad": cudnn_backward([False, True, False])}
    return {pass_name: {**{rung: (lambda f=ours[pass_name], r=rung: f(r)) for rung in rungs},
                        "cudnn": theirs[pass_name]}
            for pass_name in ours}


def other_kernel_cases(cp, torch, quick):
    """``(name, minunet callable, torch callable)`` for max-pool, ReLU, loss, optimisers."""
    from minunet.cuda import ops

    aten = torch.ops.aten
    rng = np.random.default_rng(0)
    batch, size = (4, 128) if quick else (16, 256)

    def pair(shape):
        a = rng.standard_normal(shape, dtype=np.float32)
        return cp.asarray(a), torch.from_numpy(a).cuda()

    cases = []
    x, tx = pair((batch, 64, size, size))
    _, t_indices = torch.nn.functional.max_pool2d(tx, 2, return_indices=True)
    g, tg = pair((batch, 64, size // 2, size // 2))
    pooled, indices = ops.max_pool2d(x, 2, return_indices=True)
    label = f"maxpool2x2 64ch {size}x{size} batch {batch}"
    cases.append((f"{label} forward", lambda: ops.max_pool2d(x, 2, return_indices=True),
                  lambda: torch.nn.functional.max_pool2d(tx, 2, return_indices=True)))
    cases.append((f"{label} backward", lambda: ops.max_pool2d_backward(g, x, 2, indices=indices),
                  lambda: aten.max_pool2d_with_indices_backward(
                      tg, tx, [2, 2], [2, 2], [0, 0], [1, 1], False, t_indices)))

    g2, tg2 = pair((batch, 64, size, size))
    label = f"relu 64ch {size}x{size} batch {batch}"
    cases.append((f"{label} forward", lambda: ops.relu(x), lambda: torch.relu(tx)))
    cases.append((f"{label} backward", lambda: ops.relu_backward(g2, x),
                  lambda: aten.threshold_backward(tg2, tx, 0)))

    (z, tz), (w, tw) = pair((batch, 2, size, size)), pair((batch, size, size))
    labels = rng.integers(0, 2, (batch, size, size))
    t, tt = cp.asarray(labels), torch.from_numpy(labels).cuda()

    def torch_loss():
        logits = tz.detach().requires_grad_()
        value = (torch.nn.functional.cross_entropy(logits, tt, reduction="none") * tw).mean()
        return torch.autograd.grad(value, logits)

    cases.append((f"weighted softmax cross-entropy + grad, {size}x{size} batch {batch}",
                  lambda: ops.softmax_cross_entropy(z, t, w), torch_loss))

    from minunet import UNet, optim

    net = UNet(depth=5, base_channels=64, seed=0).to("cupy")
    for p in net.parameters():
        p.grad[...] = cp.asarray(rng.standard_normal(p.grad.shape, dtype=np.float32))
    t_params = [torch.nn.Parameter(torch.as_tensor(p.data.get()).cuda())
                for p in net.parameters()]
    for tp, p in zip(t_params, net.parameters(), strict=True):
        tp.grad = torch.as_tensor(p.grad.get()).cuda()
    count = sum(p.data.size for p in net.parameters())
    for name, ours, theirs in (
            ("SGD momentum", optim.SGD(net.parameters(), lr=1e-9, momentum=0.99),
             torch.optim.SGD(t_params, lr=1e-9, momentum=0.99)),
            ("Adam", optim.Adam(net.parameters(), lr=1e-9), torch.optim.Adam(t_params, lr=1e-9))):
        cases.append((f"{name} step, U-Net {count / 1e6:.1f}M parameters", ours.step,
                      theirs.step))
    return cases


def training_step_case(cp, torch, size, batch, padding):
    """The minunet and the torch training-step callables of one network."""
    from minunet import UNet, losses, optim
    from minunet.serialization import to_torch_state_dict
    from minunet.torch_reference import TorchUNet

    net = UNet(depth=5, base_channels=64, padding=padding, seed=0)
    torch_net = TorchUNet(depth=5, base_channels=64, padding=padding)
    torch_net.load_state_dict(to_torch_state_dict(net))
    torch_net.cuda()
    net.to("cupy")
    out = net.output_size(size)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 1, size, size), dtype=np.float32)
    target = rng.integers(0, 2, (batch, out, out))
    weight = rng.uniform(0.5, 2, (batch, out, out)).astype(np.float32)
    gx, gt, gw = cp.asarray(x), cp.asarray(target), cp.asarray(weight)
    tx, tt, tw = (torch.from_numpy(a).cuda() for a in (x, target, weight))
    optimizer = optim.SGD(net.parameters(), lr=1e-4, momentum=0.99)
    torch_optimizer = torch.optim.SGD(torch_net.parameters(), lr=1e-4, momentum=0.99)

    def ours():
        net.zero_grad()
        _, grad = losses.softmax_cross_entropy(net.forward(gx), gt, gw)
        net.backward(grad, input_gradient=False)  # as PyTorch: the images need none
        optimizer.step()

    def theirs():
        torch_optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(torch_net(tx), tt, reduction="none")
                * tw).mean()
        loss.backward()
        torch_optimizer.step()

    return ours, theirs


def versions(cp, torch):
    from minunet.cuda.nvrtc import nvrtc_version

    try:
        nvrtc = ".".join(map(str, nvrtc_version()))
    except Exception:  # cuda-bindings is optional on a GPU machine
        nvrtc = "n/a"
    runtime = cp.cuda.runtime.runtimeGetVersion()
    return {
        "python": platform.python_version(), "numpy": np.__version__,
        "cupy": cp.__version__, "torch": torch.__version__,
        "cuda_runtime (CuPy)": f"{runtime // 1000}.{runtime % 1000 // 10}",
        "cuda (torch)": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "driver": cp.cuda.runtime.driverGetVersion(), "nvrtc (cuda-bindings)": nvrtc,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["ladder", "kernels", "training"],
                        choices=["ladder", "kernels", "training"])
    parser.add_argument("--quick", action="store_true", help="smaller networks and batches")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds: a call slower than this is timed once")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cp, torch = check_gpu()
    from tqdm import tqdm

    def synchronize():
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()

    compile_every_kernel()
    device_name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{device_name}: minunet (CuPy) vs PyTorch {torch.__version__} (cuDNN), float32")
    networks = QUICK_NETWORKS if args.quick else NETWORKS
    results = {
        "device": device_name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(cp, torch),
        "settings": {"dtype": "float32", "cudnn_benchmark": True, "repeats": args.repeats,
                     "quick": args.quick, "networks": networks,
                     "timing": "best of the repeats of a >= 20 ms loop, synchronized"},
        "complete": False,  # true once every section asked for has been measured
        "ladder": [], "ladder_summary": None, "kernels": [], "training_step": [],
    }

    def save():
        write_json(args.output, results)

    def free_memory():
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()

    if "ladder" in args.sections:
        layers = [(network, layer) for network, config in networks.items()
                  for layer in unet_layers(*config)]
        for network, layer in tqdm(layers, desc="ladder (layers)"):
            try:
                passes = ladder_callables(cp, torch, layer, with_naive=network == "paper")
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded, go on
                results["ladder"].append({"network": network, **layer,
                                          "error": f"{type(exc).__name__}: {exc}"})
                continue
            for pass_name, variants in passes.items():
                row = {"network": network, **layer, "pass": pass_name,
                       "gflop": pass_flop(layer) / 1e9, "ms": {}, "gflops": {}}
                for name, function in variants.items():
                    for label, tf32 in ((("cudnn_fp32", False), ("cudnn_tf32", True))
                                        if name == "cudnn" else ((name, False),)):
                        set_tf32(torch, tf32)
                        try:
                            ms = best_time(function, synchronize, args.repeats, args.budget)
                            row["ms"][label] = ms
                            row["gflops"][label] = row["gflop"] / ms * 1e3
                        except Exception as exc:  # noqa: BLE001
                            row.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"
                set_tf32(torch, False)
                results["ladder"].append(row)
            del passes
            free_memory()
            save()
        results["ladder_summary"] = ladder_summary(
            [r for r in results["ladder"] if "gflops" in r])
        save()

    def measure(section, name, make, budget_s):
        row, ours, theirs = {"name": name}, None, None
        try:
            ours, theirs = make()
            row["minunet_ms"] = best_time(ours, synchronize, args.repeats, budget_s)
            row["torch_ms"] = best_time(theirs, synchronize, args.repeats, budget_s)
            row["ratio"] = row["minunet_ms"] / row["torch_ms"]
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            del ours, theirs
            free_memory()
        results[section].append(row)
        save()

    if "kernels" in args.sections:
        for name, ours, theirs in tqdm(other_kernel_cases(cp, torch, args.quick),
                                       desc="kernels"):
            measure("kernels", name, lambda a=ours, b=theirs: (a, b), args.budget)
    if "training" in args.sections:
        for network, (size, batch, padding) in tqdm(networks.items(), desc="U-Net steps"):
            name = f"U-Net step, {network} (depth 5, base 64, {padding}), {size}x{size}, " \
                   f"batch {batch}"
            measure("training_step", name,
                    lambda s=size, b=batch, p=padding: training_step_case(cp, torch, s, b, p),
                    30.0)

    results["complete"] = True
    save()
    print_report(results)
    print(f"wrote {args.output}")
    failed = [r for r in results["ladder"] if "error" in r or "errors" in r] + [
        r for r in results["kernels"] + results["training_step"] if "error" in r]
    return 1 if failed else 0


def print_report(results) -> None:
    summary = results.get("ladder_summary")
    if summary:
        print("geometric mean over the paper U-Net's 3x3 convolutions, fraction of cuDNN fp32:")
        names = (*RUNGS, "cudnn_tf32")
        print(f"{'pass':12}" + "".join(f"{n:>12}" for n in names))
        for pass_name, fractions in summary.items():
            print(f"{pass_name:12}" + "".join(
                f"{fractions[n]:12.2f}" if fractions[n] else f"{'-':>12}" for n in names))
    rows = results["kernels"] + results["training_step"]
    if rows:
        width = max(len(r["name"]) for r in rows)
        print(f"{'':{width}}  {'minunet':>10}  {'torch':>10}  {'ratio':>7}")
        for row in rows:
            if "error" in row:
                print(f"{row['name']:{width}}  failed: {row['error']}")
            else:
                print(f"{row['name']:{width}}  {row['minunet_ms']:10.3f}  "
                      f"{row['torch_ms']:10.3f}  {row['ratio']:7.1f}")


if __name__ == "__main__":
    sys.exit(main())
