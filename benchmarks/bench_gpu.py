"""Time minunet's CUDA kernels and a U-Net training step against PyTorch on the same GPU.

PyTorch runs with cuDNN, in float32 with TF32 off (so that both sides compute in true
float32), in the same process. Each number is the best of several calls, each bracketed by
device synchronisations (minunet runs on CuPy's stream, PyTorch on its own). The table gives
``minunet / torch`` time ratios; the results go to ``benchmarks/results/gpu.json`` with the
device name, the date and the library versions.

* kernels: the convolutions (tiled, and naive where it finishes in reasonable time),
  up-convolution, max-pool, ReLU, the weighted loss and the optimiser updates, on U-Net
  layer shapes;
* training step (forward, loss, backward, SGD update): the paper's network (depth 5, 64 base
  channels, valid padding) on one 572x572 tile, and the same network with 'same' padding on a
  batch of 16 images of 256x256.

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --quick --output /tmp/gpu.json

Needs CuPy, PyTorch with CUDA, and an NVIDIA GPU; says so and exits otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "gpu.json"


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
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm per shape
    return cp, torch


def best_time(function, synchronize, repeats=5, budget_s=2.0):
    """Best time in milliseconds over up to ``repeats`` calls after one warm-up call; a call
    slower than ``budget_s`` is timed once (the warm-up, which then includes compilation)."""
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    best = time.perf_counter() - start
    if best > budget_s:
        return 1e3 * best
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def kernel_cases(cp, torch, quick):
    """``(name, minunet callable, torch callable)`` for each kernel benchmark."""
    from minunet.cuda import ops

    aten = torch.ops.aten
    rng = np.random.default_rng(0)
    batch, size = (4, 128) if quick else (16, 256)

    def pair(shape):
        a = rng.standard_normal(shape, dtype=np.float32)
        return cp.asarray(a), torch.from_numpy(a).cuda()

    cases = []

    def conv(label, x_shape, w_shape, padding, naive=False):
        (x, tx), (w, tw), (b, tb) = pair(x_shape), pair(w_shape), pair(w_shape[:1])
        y = ops.conv2d(x, w, b, padding=padding)
        g, tg = pair(y.shape)
        p = [padding, padding]
        torch_forward = lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=padding)  # noqa: E731
        torch_backward = lambda: aten.convolution_backward(  # noqa: E731
            tg, tx, tw, [w_shape[0]], [1, 1], p, [1, 1], False, [0, 0], 1, [True, True, True])
        algorithms = ("tiled", "naive") if naive else ("tiled",)
        for algorithm in algorithms:
            cases.append((f"{label} forward [{algorithm}]", lambda a=algorithm: ops.conv2d(
                x, w, b, padding=padding, algorithm=a), torch_forward))
            cases.append((f"{label} backward [{algorithm}]", lambda a=algorithm:
                          ops.conv2d_backward(g, x, w, padding=padding, algorithm=a),
                          torch_backward))

    conv(f"conv3x3 64->64 {size}x{size} batch {batch}", (batch, 64, size, size),
         (64, 64, 3, 3), 1)
    conv("conv3x3 128->128 64x64 batch 16", (16, 128, 64, 64), (128, 128, 3, 3), 1, naive=True)
    if not quick:
        conv("conv3x3 1->64 572x572 (paper, first)", (1, 1, 572, 572), (64, 1, 3, 3), 0)
        conv("conv3x3 512->1024 32x32 (paper, bottom)", (1, 512, 32, 32), (1024, 512, 3, 3), 0)

    def upconv():
        (x, tx), (w, tw) = pair((batch, 128, size // 2, size // 2)), pair((128, 64, 2, 2))
        g, tg = pair(ops.conv_transpose2d(x, w, stride=2).shape)
        label = f"upconv2x2 128->64 {size // 2}->{size} batch {batch}"
        cases.append((f"{label} forward", lambda: ops.conv_transpose2d(x, w, stride=2),
                      lambda: torch.nn.functional.conv_transpose2d(tx, tw, stride=2)))
        cases.append((f"{label} backward",
                      lambda: ops.conv_transpose2d_backward(g, x, w, stride=2),
                      lambda: aten.convolution_backward(tg, tx, tw, [64], [2, 2], [0, 0], [1, 1],
                                                        True, [0, 0], 1, [True, True, True])))

    def pool():
        x, tx = pair((batch, 64, size, size))
        _, t_indices = torch.nn.functional.max_pool2d(tx, 2, return_indices=True)
        g, tg = pair((batch, 64, size // 2, size // 2))
        label = f"maxpool2x2 64ch {size}x{size} batch {batch}"
        cases.append((f"{label} forward", lambda: ops.max_pool2d(x, 2),
                      lambda: torch.nn.functional.max_pool2d(tx, 2)))
        cases.append((f"{label} backward (ours finds the argmax again)",
                      lambda: ops.max_pool2d_backward(g, x, 2),
                      lambda: aten.max_pool2d_with_indices_backward(
                          tg, tx, [2, 2], [2, 2], [0, 0], [1, 1], False, t_indices)))

    def relu():
        (x, tx), (g, tg) = pair((batch, 64, size, size)), pair((batch, 64, size, size))
        label = f"relu 64ch {size}x{size} batch {batch}"
        cases.append((f"{label} forward", lambda: ops.relu(x), lambda: torch.relu(tx)))
        cases.append((f"{label} backward", lambda: ops.relu_backward(g, x),
                      lambda: aten.threshold_backward(tg, tx, 0)))

    def loss():
        (z, tz), (w, tw) = pair((batch, 2, size, size)), pair((batch, size, size))
        labels = rng.integers(0, 2, (batch, size, size))
        t, tt = cp.asarray(labels), torch.from_numpy(labels).cuda()

        def theirs():
            logits = tz.detach().requires_grad_()
            value = (torch.nn.functional.cross_entropy(logits, tt, reduction="none") * tw).mean()
            return torch.autograd.grad(value, logits)

        cases.append((f"weighted softmax cross-entropy + grad, {size}x{size} batch {batch}",
                      lambda: ops.softmax_cross_entropy(z, t, w), theirs))

    def optimizers():
        """SGD and Adam steps over the parameters of the paper's U-Net (31M weights)."""
        from minunet import UNet

        shapes = [p.shape for p in UNet(depth=5, base_channels=64, seed=0).parameters()]
        params, grads = [pair(s) for s in shapes], [pair(s) for s in shapes]
        velocities, m, v = ([cp.zeros(s, dtype=np.float32) for s in shapes] for _ in range(3))
        t_params = [torch.nn.Parameter(tp) for _, tp in params]
        for tp, (_, tg) in zip(t_params, grads, strict=True):
            tp.grad = tg
        sgd = torch.optim.SGD(t_params, lr=1e-6, momentum=0.99)
        adam = torch.optim.Adam(t_params, lr=1e-6)
        count = sum(int(np.prod(s)) for s in shapes)

        def our_sgd():
            for (p, _), (g, _), velocity in zip(params, grads, velocities, strict=True):
                ops.sgd_momentum_update(p, g, velocity, 1e-6, 0.99)

        def our_adam():
            for (p, _), (g, _), m_i, v_i in zip(params, grads, m, v, strict=True):
                ops.adam_update(p, g, m_i, v_i, 1, 1e-6)

        cases.append((f"SGD momentum step, U-Net {count / 1e6:.1f}M parameters", our_sgd, sgd.step))
        cases.append((f"Adam step, U-Net {count / 1e6:.1f}M parameters", our_adam, adam.step))

    upconv()
    pool()
    relu()
    loss()
    optimizers()
    return cases


def training_step_cases(cp, torch, quick):
    """``(name, setup)``: ``setup()`` returns the minunet and the torch step callables."""
    from minunet import UNet
    from minunet.cuda import ops
    from minunet.serialization import to_torch_state_dict
    from minunet.torch_reference import TorchUNet

    def setup(size, batch, padding, depth, base):
        def make():
            net = UNet(depth=depth, base_channels=base, padding=padding, seed=0)
            torch_net = TorchUNet(depth=depth, base_channels=base, padding=padding)
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
            velocities = [cp.zeros_like(p.data) for p in net.parameters()]
            optimizer = torch.optim.SGD(torch_net.parameters(), lr=1e-4, momentum=0.99)

            def ours():
                net.zero_grad()
                _, grad = ops.softmax_cross_entropy(net.forward(gx), gt, gw)
                net.backward(grad)
                for p, v in zip(net.parameters(), velocities, strict=True):
                    ops.sgd_momentum_update(p.data, p.grad, v, 1e-4, 0.99)

            def theirs():
                optimizer.zero_grad()
                logits = torch_net(tx)
                loss = (torch.nn.functional.cross_entropy(logits, tt, reduction="none")
                        * tw).mean()
                loss.backward()
                optimizer.step()

            return ours, theirs

        return make

    if quick:
        return [("U-Net step, depth 4, base 32, 'same', 128x128, batch 4",
                 setup(128, 4, "same", 4, 32))]
    return [
        ("U-Net step, paper (depth 5, base 64, valid), 572x572, batch 1",
         setup(572, 1, "valid", 5, 64)),
        ("U-Net step, depth 5, base 64, 'same', 256x256, batch 16",
         setup(256, 16, "same", 5, 64)),
    ]


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


def write_json_atomically(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=1)
    os.replace(f.name, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer cases")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-training", action="store_true", help="kernels only")
    args = parser.parse_args(argv)
    cp, torch = check_gpu()
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU machine may lack it; progress bars are a nicety

        def tqdm(iterable, **_):
            return iterable

    def synchronize():
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()

    device_name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{device_name}: minunet (CuPy) vs PyTorch {torch.__version__} (cuDNN), float32, "
          f"TF32 off; times in ms, best of {args.repeats}")
    results = {
        "device": device_name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(cp, torch),
        "settings": {"dtype": "float32", "tf32": False, "cudnn_benchmark": True,
                     "repeats": args.repeats, "quick": args.quick,
                     "timing": "best of the repeats, synchronize before and after"},
        "kernels": [],
        "training_step": [],
    }

    def measure(section, name, make, repeats, budget_s):
        """Time one case; a failure (e.g. out of memory) is recorded and the run goes on.
        The JSON is rewritten after every case, so a run cut short keeps what it measured."""
        row, ours, theirs = {"name": name}, None, None
        try:
            ours, theirs = make()
            row["minunet_ms"] = best_time(ours, synchronize, repeats, budget_s)
            row["torch_ms"] = best_time(theirs, synchronize, repeats, budget_s)
            row["ratio"] = row["minunet_ms"] / row["torch_ms"]
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            del ours, theirs  # the case's arrays go back to the pools before they are freed
            cp.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
        results[section].append(row)
        write_json_atomically(args.output, results)

    for name, ours, theirs in tqdm(kernel_cases(cp, torch, args.quick), desc="kernels"):
        measure("kernels", name, lambda a=ours, b=theirs: (a, b), args.repeats, 2.0)
    if not args.no_training:
        for name, make in tqdm(training_step_cases(cp, torch, args.quick), desc="U-Net steps"):
            measure("training_step", name, make, 3, 30.0)

    rows = results["kernels"] + results["training_step"]
    width = max(len(r["name"]) for r in rows)
    print(f"{'':{width}}  {'minunet':>10}  {'torch':>10}  {'ratio':>7}")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:{width}}  failed: {row['error']}")
        else:
            print(f"{row['name']:{width}}  {row['minunet_ms']:10.3f}  {row['torch_ms']:10.3f}  "
                  f"{row['ratio']:7.1f}")
    print(f"wrote {args.output}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
