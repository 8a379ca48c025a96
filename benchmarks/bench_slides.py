"""Whole-slide prediction and counting on Dask: speed, peak memory and the cell count.

1. Trains a small valid-padding U-Net (2 levels, 4 channels) on synthetic cells for a few
   hundred steps (the count check needs a network that finds cells).
2. Writes a synthetic slide of ``--size`` x ``--size`` pixels (default 16384) chunk by chunk
   to a Zarr store: separate round cells on a jittered grid, blurred, with camera noise. The
   number of cells is known exactly, and many of them cross chunk borders and corners.
3. Predicts an 8192 x 8192 lazy image to Zarr with Dask's local threaded scheduler in a
   fresh process: its peak RSS (``ru_maxrss``), to set against the 1.5 GB budget.
4. Predicts the slide to Zarr with ``minunet.slides`` on a ``dask.distributed`` cluster of 2
   and of 1 local worker processes (one thread each): pixels per second and the peak
   resident memory of all processes together (sampled every 0.2 s).
5. Counts the cells from the stored probabilities on 2 workers and compares with the truth.

Writes ``benchmarks/results/slides.json`` after every stage (``stages_done`` says how far a
run got). Run (about 15 minutes on 2 idle cores):

    python benchmarks/bench_slides.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

RESULTS = Path(__file__).parent / "results" / "slides.json"
CELL_SPACING = 40  # px between grid points; radii <= 12 and jitter <= 5 keep cells apart
BLOCK = 1024  # edge of the blocks the slide is written in


def train_network(steps: int):
    import minunet
    from minunet.data import Dataset, synthetic_cells
    from minunet.train import fit

    images, labels = synthetic_cells(12, 192, seed=0)
    val_images, val_labels = synthetic_cells(2, 192, seed=1)
    net = minunet.UNet(depth=2, base_channels=4, padding="valid", batch_norm=True, seed=0)
    start = time.perf_counter()
    history = fit(net, Dataset(list(images), list(labels), [str(i) for i in range(12)]),
                  Dataset(list(val_images), list(val_labels), ["v0", "v1"]),
                  steps=steps, steps_per_epoch=steps, batch_size=4, tile_size=64,
                  augment=False, progress=False)
    return net, time.perf_counter() - start, history.epochs[-1] if history.epochs else {}


def synthetic_cell_table(size: int, seed: int = 0):
    """Cells (row, col, radius, brightness) on a jittered grid covering the slide."""
    rng = np.random.default_rng(seed)
    grid = np.arange(CELL_SPACING // 2, size, CELL_SPACING, dtype=np.float64)
    rows, cols = (a.ravel() for a in np.meshgrid(grid, grid, indexing="ij"))
    rows = rows + rng.uniform(-5, 5, rows.shape)
    cols = cols + rng.uniform(-5, 5, cols.shape)
    keep = rng.random(rows.shape) < 0.8  # leave some grid points empty
    n = int(keep.sum())
    return np.stack([rows[keep], cols[keep], rng.uniform(7, 12, n), rng.uniform(0.4, 1.0, n)], 1)


def render_block(cells, top: int, left: int, edge: int, seed: int) -> np.ndarray:
    """One block of the slide, uint16: cells drawn with a halo so the blur is seamless."""
    halo = 16
    canvas = np.full((edge + 2 * halo, edge + 2 * halo), 0.08)
    near = ((cells[:, 0] > top - halo - 13) & (cells[:, 0] < top + edge + halo + 13)
            & (cells[:, 1] > left - halo - 13) & (cells[:, 1] < left + edge + halo + 13))
    for row, col, radius, brightness in cells[near]:
        r, c = row - top + halo, col - left + halo
        r0, r1 = max(int(r - radius) - 1, 0), min(int(r + radius) + 2, canvas.shape[0])
        c0, c1 = max(int(c - radius) - 1, 0), min(int(c + radius) + 2, canvas.shape[1])
        if r0 >= r1 or c0 >= c1:
            continue
        yy, xx = np.ogrid[r0:r1, c0:c1]
        rho2 = ((yy - r) ** 2 + (xx - c) ** 2) / radius**2
        inside = rho2 < 1
        canvas[r0:r1, c0:c1][inside] = 0.08 + brightness * (1 - 0.35 * rho2[inside])
    canvas = ndimage.gaussian_filter(canvas, 1.0)[halo:-halo, halo:-halo]
    noisy = canvas + np.random.default_rng(seed).normal(0, 0.02, canvas.shape)
    return np.round(np.clip(noisy, 0, 1) * 65535).astype(np.uint16)


def write_slide(path: Path, size: int, cells) -> None:
    import zarr

    slide = zarr.create_array(store=str(path), shape=(size, size), dtype=np.uint16,
                              chunks=(BLOCK, BLOCK), overwrite=True)
    for i, top in enumerate(range(0, size, BLOCK)):
        for j, left in enumerate(range(0, size, BLOCK)):
            edge = min(BLOCK, size - top, size - left)
            slide[top:top + edge, left:left + edge] = render_block(cells, top, left, edge,
                                                                   seed=i * 1000 + j)


class PeakMemory:
    """Peak of the summed RSS of this process and all its descendants (sampled)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except Exception:  # a process that just ended
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_on_cluster(workers: int, task):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, memory_limit=None) as cluster, Client(cluster):
        with PeakMemory() as memory:
            start = time.perf_counter()
            result = task()
            seconds = time.perf_counter() - start
    return result, seconds, memory.peak


def memory_check(size: int, model: str, chunk_size: int, out: str) -> None:
    """Child process: predict a lazy size x size image to Zarr on the threaded scheduler."""
    import dask.array as da

    import minunet
    from minunet import slides

    net = minunet.load(model)
    image = da.random.default_rng(0).random((size, size), chunks=chunk_size, dtype=np.float32)
    start = time.perf_counter()
    slides.write_probabilities(slides.predict(net, image, chunk_size=chunk_size), out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--memory-size", type=int, default=8192)
    parser.add_argument("--work", default=None,
                        help="folder for the model, the slide and the outputs (kept; a model "
                             "and slide found there are reused)")
    parser.add_argument("--memory-check", nargs=4, metavar=("SIZE", "MODEL", "CHUNK", "OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.memory_check:
        size, model, chunk, out = args.memory_check
        memory_check(int(size), model, int(chunk), out)
        return

    from threadpoolctl import threadpool_info

    import minunet
    from minunet import slides

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-slides-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "net.npz"
    result = {
        "benchmark": "whole-slide prediction and counting with minunet.slides on Dask",
        "command": "python benchmarks/bench_slides.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "blas": [{k: i.get(k) for k in ("internal_api", "num_threads",
                                                    "architecture")}
                             for i in threadpool_info()]},
        "stages_done": [],
    }

    def save(stage):
        """Results so far, after every stage: a run cut short still reports what it did."""
        result["stages_done"].append(stage)
        result["machine"]["load_average"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    if model.exists():
        net = minunet.load(model)
        result["network"] = {**net.config, "trained": f"reused from {model.name}"}
    else:
        net, train_seconds, last_epoch = train_network(args.train_steps)
        minunet.save(net, model)
        result["network"] = {**net.config, "trained_steps": args.train_steps,
                             "trained_seconds": round(train_seconds, 1),
                             "last_epoch": last_epoch}
        print(f"trained {net!r} in {train_seconds:.0f} s: {last_epoch}", flush=True)
    result["network"]["note"] = ("a deliberately small network (2 levels, 4 channels), so "
                                 "that a 16384^2 slide fits the run time on 2 shared cores")

    cells = synthetic_cell_table(args.size)
    slide_path = work / f"slide{args.size}.zarr"
    if not slide_path.exists():
        start = time.perf_counter()
        write_slide(slide_path, args.size, cells)
        print(f"slide {args.size}^2 with {len(cells)} cells written in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    result["slide"] = {"size": args.size, "chunk_size": args.chunk_size, "dtype": "uint16",
                       "store": "Zarr, written block by block", "true_cells": len(cells)}
    save("prepare")

    child = subprocess.run(
        [sys.executable, __file__, "--memory-check", str(args.memory_size), str(model),
         str(args.chunk_size), str(work / "memory.zarr")],
        capture_output=True, text=True, check=True)
    memory = json.loads(child.stdout.strip().splitlines()[-1])
    result["memory_check"] = {"size": args.memory_size, "scheduler": "local threads",
                              "budget_bytes": int(1.5e9), **memory}
    print(f"{args.memory_size}^2 lazy image to Zarr (threads): peak RSS "
          f"{memory['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    save("memory_check")

    pixels = args.size**2
    result["predict"] = []
    for workers in (2, 1):
        out = work / f"prob{workers}.zarr"
        _, seconds, peak = run_on_cluster(workers, lambda out=out: slides.write_probabilities(
            slides.predict(model_net(model), str(slide_path), chunk_size=args.chunk_size),
            out, progress=True))
        result["predict"].append({"workers": workers, "seconds": seconds,
                                  "pixels_per_second": pixels / seconds,
                                  "peak_rss_bytes": peak})
        print(f"predict, {workers} worker(s): {pixels / seconds:,.0f} px/s, "
              f"peak RSS {peak / 2**30:.2f} GiB", flush=True)
        save(f"predict_{workers}_workers")
        if workers == 2:
            # The synthetic cells never touch: connected components are the cells, so the
            # count uses separate=False (the watershed split costs ~10 s per megapixel).
            counted, count_seconds, count_peak = run_on_cluster(2, lambda: slides.count_cells(
                str(work / "prob2.zarr"), chunk_size=args.chunk_size, separate=False,
                progress=True))
            print(f"counted {counted.count} cells, truth {len(cells)}", flush=True)
            result["count"] = {
                "workers": 2, "found": counted.count, "true": len(cells),
                "relative_error": (counted.count - len(cells)) / len(cells),
                "matched_within_3px": match_centroids(counted.centroids, cells[:, :2]),
                "seconds": count_seconds, "pixels_per_second": pixels / count_seconds,
                "peak_rss_bytes": count_peak, "separate": False}
            save("count")
    result["speedup_2_workers"] = result["predict"][1]["seconds"] / result["predict"][0]["seconds"]
    save("done")
    print(f"wrote {args.out}")
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def model_net(path):
    import minunet

    return minunet.load(path)


def match_centroids(found, truth, tolerance: float = 3.0) -> int:
    """Number of true cells with a found centroid within ``tolerance`` px (one each)."""
    from scipy.spatial import cKDTree

    if len(found) == 0:
        return 0
    distance, index = cKDTree(found).query(truth, distance_upper_bound=tolerance)
    hits = np.isfinite(distance)
    return int(len(np.unique(index[hits])))


if __name__ == "__main__":
    main()
