"""The GPU benchmark's bookkeeping, which runs without a GPU: the layers it times, the
operations it counts, and the summary it draws the book's ladder from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minunet.backend import gpu_available
from minunet.torch_reference import TorchUNet

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("network", ["paper", "same"])
def test_the_timed_layers_count_what_pytorch_counts(bench, network):
    """The layers of each benchmark network, and the operations of their forward passes,
    against PyTorch's FLOP counter on the same network (on the meta device: no compute)."""
    size, batch, padding = bench.NETWORKS[network]
    layers = bench.unet_layers(size, batch, padding)
    assert [layer["kind"] for layer in layers].count("upconv") == 4 and len(layers) == 23
    net = TorchUNet(depth=5, base_channels=64, padding=padding).to("meta")
    with FlopCounterMode(display=False) as counter:
        net(torch.empty(batch, 1, size, size, device="meta"))
    assert sum(bench.pass_flop(layer) for layer in layers) == counter.get_total_flops()


def test_ladder_summary_is_the_geometric_mean_of_fractions_of_cudnn(bench):
    def row(pass_name, blocked, cudnn, R=3):  # noqa: N803 - the kernel height, as in conv2d.cu
        return {"network": "paper", "kind": "conv", "R": R, "pass": pass_name,
                "gflops": {"blocked": blocked, "cudnn_fp32": cudnn}}

    rows = [row("forward", 10.0, 40.0), row("forward", 40.0, 40.0),
            row("forward", 1.0, 100.0, R=1)]  # the 1x1 head is left out
    summary = bench.ladder_summary(rows)
    assert summary["forward"]["blocked"] == pytest.approx(0.5)  # sqrt(0.25 * 1)
    assert summary["forward"]["naive"] is None and summary["weight_grad"]["blocked"] is None


@pytest.mark.skipif(gpu_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_the_benchmark_says_so(bench):
    with pytest.raises(SystemExit, match="needs CuPy"):
        bench.main(["--quick"])
