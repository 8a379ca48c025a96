"""Whole-slide images: prediction and cell counting on images larger than memory, on Dask.

The overlap-tile strategy of :mod:`minunet.inference` scales to a slide of 10^10 pixels once
the slide itself is never held whole. The slide becomes a lazy Dask array cut into chunks;
every chunk is predicted from a window that adds a *halo* of its neighbours' pixels (Dask's
``overlap``: exactly the paper's overlap-tile, one level up), and the probabilities flow
chunk by chunk to disk. Dask runs the same task graph on local threads, local processes or
a ``dask.distributed`` cluster.

Why the chunked result equals :func:`minunet.predict` on the whole image (valid padding):

* every chunk starts at a multiple of the max-pool quantum ``2**(depth - 1)``, so each 2x2
  pool of the network sees the same pixel pairs as in the whole-image pass;
* the halo (the network's context, rounded up to the quantum) holds every pixel the chunk's
  receptive fields reach; inside a chunk's window, ``minunet.predict`` mirror-pads the window
  itself, which only changes output pixels in the halo, and those are thrown away;
* at the slide's border there is no halo: the window ends at the border and is mirrored
  there exactly as the whole image is.

A 'same'-padding network sees zeros at the border of every tile, so its result depends a
little on where the chunks are (see :data:`SAME_PADDING_TOLERANCE`).

Counting: every chunk labels the cells of its window (chunk + halo) with
:func:`minunet.postprocess.label_instances` and keeps the cells whose centroid lies inside
the chunk. A cell crossing a chunk border or corner is seen whole by every chunk whose
window contains it, and its centroid lies in exactly one chunk, so it is counted once. This
holds as long as every group of touching cells is smaller than the halo (``cell_size``); a
kept cell that reaches the edge of its window would have been cut, and is reported with a
warning.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minunet.backend import to_numpy
from minunet.inference import context_margin, tiling_plan
from minunet.inference import predict as predict_in_memory
from minunet.postprocess import foreground_probability, label_instances

# Edge of the output tile of one forward pass inside a chunk: bounds the memory of a task
# (activations and im2col buffers grow with the tile's area), whatever the chunk size.
DEFAULT_TILE_SIZE = 512
# Bound on the difference between chunked and whole-image probabilities of a 'same'-padding
# network whose receptive field outgrows the halo: an untrained 4-level network differed by
# up to 0.04 in the tests (a 3-level one, whose receptive field fits the halo, by 0). A
# valid network agrees to float32 rounding.
SAME_PADDING_TOLERANCE = 0.05
# Halo (px) of the counting windows: cells and groups of touching cells up to about this
# size are counted exactly once.
DEFAULT_CELL_SIZE = 64
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf")
PERCENTILES = (1.0, 99.8)  # the ones minunet.data.as_image maps to 0 and 1


class SlideError(ValueError):
    """A slide, chunk size or scheduler that cannot be used, said in one line."""


# --- the network, shipped to workers once ---------------------------------------------------

_built = threading.local()  # per thread: token -> UNet, so no two threads share layer caches


class PortableNetwork:
    """A U-Net reduced to its configuration and weights.

    Pickling a :class:`minunet.UNet` would also ship whatever its layers cached in the last
    forward pass (tens of MB); this object ships only the weights. Each worker thread builds
    the network from them once, on first use, and reuses it for every chunk it computes
    (:meth:`network`): the weights travel once per worker and the layers are built once.
    """

    def __init__(self, net):
        self.config = dict(net.config)
        self.state = {name: np.array(to_numpy(value)) for name, value in net.state_dict().items()}
        self.device = net.device
        digest = hashlib.sha256(repr(sorted(self.config.items())).encode())
        for name in sorted(self.state):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.state[name]).tobytes())
        self.token = digest.hexdigest()

    def network(self):
        """The network of this thread (built on the first call, in eval mode)."""
        cache = getattr(_built, "networks", None)
        if cache is None:
            cache = _built.networks = {}
        if self.token not in cache:
            from minunet.unet import UNet

            net = UNet(**self.config)
            net.load_state_dict(self.state)
            if self.device == "cupy":
                net.to("cupy")
            net.eval()
            cache[self.token] = net
        return cache[self.token]


def _portable(net) -> PortableNetwork:
    return net if isinstance(net, PortableNetwork) else PortableNetwork(net)


# --- opening a slide lazily -----------------------------------------------------------------


class _TiffLevel:
    """Level 0 of a (tiled, BigTIFF, pyramidal) TIFF as an array-like that reads only the
    requested region, through tifffile's Zarr interface. Pickles as its path, so tasks on
    other processes reopen the file."""

    def __init__(self, path: str):
        self.path = path
        array = self._open()
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.chunks = array.chunks
        array.store.close()  # reopened, lazily, by whichever process reads
        self._array = None

    def _open(self):
        import tifffile
        import zarr

        with tifffile.TiffFile(self.path) as tiff:
            if not tiff.series:
                raise SlideError(f"{self.path}: the TIFF holds no image")
        store = tifffile.imread(self.path, aszarr=True, series=0, level=0)
        return zarr.open_array(store, mode="r")

    def __getitem__(self, region):
        if self._array is None:
            self._array = self._open()
        return self._array[region]

    def __getstate__(self):
        return {**vars(self), "_array": None}


def _open_zarr(path: str):
    import zarr

    found = zarr.open(path, mode="r")
    if isinstance(found, zarr.Array):
        return found
    arrays = dict(found.arrays())
    if "0" in arrays:  # a multiscale pyramid (OME-Zarr): level 0 is the full resolution
        return arrays["0"]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise SlideError(f"{path}: a Zarr group with arrays {sorted(arrays)}; pass one array")


def open_slide(source, chunk_size: int = 2048, *, name: str = "slide"):
    """``source`` as a lazy Dask array, in its own dtype and layout.

    ``source``: a NumPy, Dask or Zarr array, or the path of a TIFF (level 0 of the first
    series, read region by region, never whole) or of a Zarr store.
    """
    import dask.array as da

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise SlideError(f"{name} {path}: no such file or directory")
        if Path(path).suffix.lower() in TIFF_SUFFIXES:
            try:
                source = _TiffLevel(path)
            except (OSError, ValueError) as exc:
                raise SlideError(f"{name} {path}: not a readable TIFF ({exc})") from exc
            stamp = f"{os.path.abspath(path)}:{os.stat(path).st_mtime_ns}"
            return da.from_array(source, chunks=_chunks_like(source, chunk_size), asarray=False,
                                 fancy=False,
                                 name=f"tiff-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}")
        try:
            source = _open_zarr(path)
        except (OSError, ValueError, KeyError) as exc:
            raise SlideError(f"{name} {path}: neither a TIFF nor a readable Zarr store "
                             f"({type(exc).__name__})") from exc
    if isinstance(source, da.Array):
        return source
    if hasattr(source, "shape") and hasattr(source, "dtype") and hasattr(source, "__getitem__"):
        return da.from_array(source, chunks=_chunks_like(source, chunk_size))
    raise SlideError(f"{name} must be a NumPy, Dask or Zarr array or the path of a TIFF or Zarr "
                     f"store, got {type(source).__name__}")


def _chunks_like(array, chunk_size: int):
    """Reading chunks: ``chunk_size`` on the two image axes, whole along a channel axis."""
    if array.ndim == 2:
        return (chunk_size, chunk_size)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] not in (1, 3, 4):
        return (chunk_size, chunk_size, -1)
    return (-1,) + (chunk_size,) * (array.ndim - 1)


def _channels_first(slide, channels: int, name: str):
    """(H, W), (C, H, W) or colour (H, W, 3|4) -> lazy (C, H, W) for a network with
    ``channels`` input channels (colour averaged to gray for a one-channel network)."""
    if slide.ndim == 3 and slide.shape[-1] in (3, 4) and slide.shape[0] not in (1, 3, 4):
        slide = slide[..., :3].transpose(2, 0, 1)
    if slide.ndim == 2:
        slide = slide[None]
    if slide.ndim != 3:
        raise SlideError(f"{name} must be one 2-D image (H, W), (C, H, W) or colour (H, W, 3), "
                         f"got {slide.ndim} dimensions {slide.shape}")
    if slide.shape[0] != channels and not (channels == 1 and slide.shape[0] == 3):
        raise SlideError(f"{name} has shape {slide.shape}: a stack of {slide.shape[0]} images "
                         f"or channels, but the network takes {channels} channel(s); pass one "
                         "2-D image")
    if min(slide.shape[1:]) < 1:
        raise SlideError(f"{name} is empty: shape {slide.shape}")
    return slide


def _percentile(histogram, first_value: int, q: float) -> float:
    """``np.percentile(values, q)`` (linear) of the values counted by ``histogram``."""
    cumulative = np.cumsum(histogram)
    position = q / 100 * (cumulative[-1] - 1)
    below = math.floor(position)

    def order_statistic(k):
        return float(first_value + np.searchsorted(cumulative, k, side="right"))

    low, high = order_statistic(below), order_statistic(min(below + 1, cumulative[-1] - 1))
    fraction = position - below
    # the same two formulas as NumPy's interpolation, so the numbers agree to the last bit
    if fraction >= 0.5:
        return high - (high - low) * (1 - fraction)
    return low + (high - low) * fraction


def _scaled(slide, name: str):
    """Float images pass as they are (in [0, 1], as :func:`minunet.predict` expects);
    integer images are scaled as :func:`minunet.data.as_image` does: the 1st and 99.8th
    percentiles (exact, from a histogram summed over the chunks) become 0 and 1."""
    import dask.array as da

    if np.issubdtype(slide.dtype, np.floating):
        return slide.astype(np.float32)
    if slide.dtype == bool:
        slide = slide.astype(np.uint8)
    if not np.issubdtype(slide.dtype, np.integer) or slide.dtype.itemsize > 2:
        raise SlideError(f"{name} must be float in [0, 1] or 8/16-bit integers, got "
                         f"{slide.dtype}; convert it first")
    first = int(np.iinfo(slide.dtype).min)
    bins = 2 ** (8 * slide.dtype.itemsize)
    per_chunk = slide.map_blocks(  # one histogram per chunk, summed as a tree
        _chunk_histogram, first, bins, new_axis=slide.ndim, dtype=np.int64,
        chunks=tuple((1,) * n for n in slide.numblocks) + ((bins,),))
    histogram = np.asarray(per_chunk.sum(axis=tuple(range(slide.ndim))).compute())
    low, high = (_percentile(histogram, first, q) for q in PERCENTILES)
    if high <= low:
        return da.zeros(slide.shape, np.float32, chunks=slide.chunks)
    return slide.map_blocks(_rescale, low, high, dtype=np.float32)


def _chunk_histogram(block, first, bins):
    counts = np.bincount((block.astype(np.int64) - first).ravel(), minlength=bins)
    return counts.reshape((1,) * block.ndim + (bins,))


def _rescale(block, low, high):
    return np.clip((block.astype(np.float64) - low) / (high - low), 0, 1).astype(np.float32)


def prepare_slide(source, channels: int, chunk_size: int = 2048, *, name: str = "slide"):
    """``source`` opened lazily as float32 (C, H, W) in [0, 1] for a network with
    ``channels`` input channels."""
    slide = _channels_first(open_slide(source, chunk_size, name=name), channels, name)
    slide = _scaled(slide, name)
    if slide.shape[0] != channels:  # colour slide, one-channel network: gray, as the CLI does
        slide = slide.mean(axis=0, keepdims=True, dtype=np.float32)
    return slide


# --- chunking -------------------------------------------------------------------------------


def chunk_edges(length: int, chunk_size: int, quantum: int, halo: int,
                context: str = "the network's context") -> tuple[int, ...]:
    """Chunk lengths along one axis: all start at multiples of ``quantum``; a last chunk
    shorter than ``halo`` joins the one before it (a neighbour's halo must fit in a chunk)."""
    step = chunk_size // quantum * quantum
    if step < max(halo, quantum):
        raise SlideError(f"chunk_size {chunk_size} is smaller than {context}: use at least "
                         f"{max(halo, quantum)}" + (f" (a multiple of {quantum})" if quantum > 1
                                                    else ""))
    sizes = [step] * (length // step) + ([length % step] if length % step else [])
    if len(sizes) > 1 and sizes[-1] < halo:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return tuple(sizes)


def network_halo(net, margin: int | None) -> tuple[int, int]:
    """``(halo, margin)``: the context a chunk needs on each side (a multiple of the
    max-pool quantum, so every window starts on the pooling grid) and the 'same'-padding
    margin handed to :func:`minunet.predict` (0 for a valid network)."""
    quantum = 2 ** (net.config["depth"] - 1)
    try:
        margin = context_margin(net, margin)
    except ValueError as exc:
        raise SlideError(str(exc)) from None
    offset = tiling_plan(net, quantum, None, margin)[4]  # (input - output) / 2 + margin
    return -(-offset // quantum) * quantum, margin


def _check_size(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise SlideError(f"{name} must be a positive int, got {value!r}")


# --- prediction -----------------------------------------------------------------------------


def predict(net, source, *, chunk_size: int = 2048, tile_size: int | None = None,
            margin: int | None = None, tta: bool = False):
    """Class probabilities of a slide, lazily: a Dask array float32 (num_classes, H, W).

    Parameters
    ----------
    net : minunet.UNet or PortableNetwork
        Shipped to the workers as its weights only, built once per worker thread.
    source : NumPy, Dask or Zarr array, or path of a TIFF or Zarr store
        (H, W), (C, H, W) or colour (H, W, 3). Floats are taken as in [0, 1]; 8/16-bit
        integers are scaled as :func:`minunet.data.as_image` does.
    chunk_size : int
        Edge of the chunks (rounded down to a multiple of ``2**(depth - 1)``); a task holds
        one chunk with its halo, so memory grows with ``chunk_size**2``, not with the slide.
    tile_size : int or None
        Edge of the output tile of one forward pass inside a chunk (default
        ``min(chunk_size, DEFAULT_TILE_SIZE)``).
    margin, tta
        As in :func:`minunet.predict`. With ``tta`` the flips turn each chunk's window, so
        the result agrees with the whole-image one only to within
        :data:`SAME_PADDING_TOLERANCE`.

    Nothing is computed until the result is: ``.compute()`` for a small slide,
    ``.to_zarr(path)`` (or :func:`write_probabilities`) for a large one.
    """
    import dask
    import dask.array as da

    _check_size(chunk_size, "chunk_size")
    _check_size(tile_size, "tile_size", allow_none=True)
    portable = _portable(net)
    config = portable.config
    halo, margin = network_halo(portable.network(), margin)
    quantum = 2 ** (config["depth"] - 1)
    slide = prepare_slide(source, config["in_channels"], chunk_size)
    rows, cols = (chunk_edges(n, chunk_size, quantum, halo) for n in slide.shape[1:])
    slide = slide.rechunk(((slide.shape[0],), rows, cols))
    windows = da.overlap.overlap(slide, depth={0: 0, 1: halo, 2: halo}, boundary="none")
    return windows.map_blocks(
        _predict_window, dask.delayed(portable, pure=True, traverse=False), halo,
        min(tile_size or DEFAULT_TILE_SIZE, chunk_size), margin, tta,
        chunks=((config["num_classes"],), rows, cols), dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32), name="predict-chunk")


def _predict_window(window, portable, halo, tile_size, margin, tta, block_info=None):
    """Probabilities of one chunk from its window (the chunk plus up to ``halo`` px of its
    neighbours on every side that is not the slide's border)."""
    where = block_info[None]
    (_, row, col), (_, num_rows, num_cols) = where["chunk-location"], where["num-chunks"]
    net = portable.network()
    probabilities = predict_in_memory(net, window, tile_size=tile_size, tta=tta,
                                      margin=margin or None)
    net.to(net.device)  # drops the activations the layers cached for a backward pass
    top, left = (halo if row else 0), (halo if col else 0)
    bottom = probabilities.shape[1] - (halo if row < num_rows - 1 else 0)
    right = probabilities.shape[2] - (halo if col < num_cols - 1 else 0)
    return probabilities[:, top:bottom, left:right]


# --- counting -------------------------------------------------------------------------------


class SlideCellCount(NamedTuple):
    """Result of :func:`count_cells`: the number of cells, their centroids (float64
    (count, 2): row, column in slide pixels) and areas (int64, pixels), in raster order of
    the centroids."""

    count: int
    centroids: np.ndarray
    areas: np.ndarray


def foreground(prob_or_image, net=None, *, chunk_size: int = 2048, **predict_options):
    """The lazy foreground probability (H, W) of a slide: from ``net``'s prediction when
    ``net`` is given, else ``prob_or_image`` is already a probability map (H, W) or class
    probabilities (C, H, W) (array or path of a Zarr store)."""
    if net is not None:
        return 1 - predict(net, prob_or_image, chunk_size=chunk_size, **predict_options)[0]
    prob = open_slide(prob_or_image, chunk_size, name="probabilities")
    # probabilities stored as uint8 (see write_probabilities) are in 1/255 steps
    prob = prob / 255 if prob.dtype == np.uint8 else prob
    prob = prob.astype(np.float32)
    if prob.ndim == 3 and prob.shape[0] >= 2:
        return 1 - prob[0]
    if prob.ndim != 2:
        raise SlideError(f"probabilities must be (H, W) or (C >= 2, H, W), got {prob.shape}")
    return prob


def count_cells(prob_or_image, net=None, *, chunk_size: int = 2048, threshold: float = 0.5,
                min_size: int = 10, h: float = 0.5, smoothing: float = 1.0,
                separate: bool = True, cell_size: int = DEFAULT_CELL_SIZE,
                tile_size: int | None = None, tta: bool = False,
                progress: bool = False) -> SlideCellCount:
    """Count the cells of a slide chunk by chunk, as :func:`minunet.count_cells` does for an
    image in memory (same ``threshold``, ``min_size``, ``h``, ``smoothing``; ``separate``
    as in :func:`minunet.postprocess.label_instances`: False keeps touching cells together,
    much faster where cells do not touch).

    ``cell_size``: halo of every chunk's window, in pixels; cells and groups of touching
    cells smaller than this are counted exactly once wherever the chunk borders fall.
    ``progress``: a tqdm bar over the chunks.
    """
    _check_size(cell_size, "cell_size")
    fg = foreground(prob_or_image, net, chunk_size=chunk_size, tile_size=tile_size, tta=tta)
    tasks = cell_tasks(fg, chunk_size=chunk_size, cell_size=cell_size, threshold=threshold,
                       min_size=min_size, h=h, smoothing=smoothing, separate=separate)
    return gather_cells(compute_chunks(tasks, "counting", progress))


def cell_tasks(fg, *, chunk_size: int, cell_size: int, **label_options) -> list:
    """One delayed task per chunk of ``fg`` (lazy (H, W)): the cells it owns, as an array
    (n, 4) of centroid row, centroid column, area, and 1 where the cell was cut by the
    window (0 otherwise)."""
    import dask
    import dask.array as da

    _check_size(chunk_size, "chunk_size")
    rows, cols = (chunk_edges(n, chunk_size, 1, cell_size, "the counting halo (cell_size)")
                  for n in fg.shape)
    fg = fg.rechunk((rows, cols))
    windows = da.overlap.overlap(fg, depth=cell_size, boundary="none").to_delayed()
    row_starts, col_starts = np.cumsum((0,) + rows), np.cumsum((0,) + cols)
    count_window = dask.delayed(_cells_in_window, pure=True)
    return [count_window(windows[i, j], (row_starts[i], row_starts[i + 1]),
                         (col_starts[j], col_starts[j + 1]), fg.shape, cell_size,
                         label_options, dask_key_name=f"count-chunk-{fg.name}-{i}-{j}")
            for i in range(len(rows)) for j in range(len(cols))]


def _cells_in_window(window, row_span, col_span, shape, halo, label_options):
    """Cells of one window whose centroid lies in its chunk (see the module docstring)."""
    window_top = max(row_span[0] - halo, 0)
    window_left = max(col_span[0] - halo, 0)
    labels = label_instances(foreground_probability(window), **label_options)
    num = int(labels.max(initial=0))
    if num == 0:
        return np.zeros((0, 4))
    grid_rows, grid_cols = np.indices(labels.shape)
    areas = np.bincount(labels.ravel(), minlength=num + 1)[1:]
    centroid_rows = np.bincount(labels.ravel(), grid_rows.ravel(), num + 1)[1:] / areas
    centroid_cols = np.bincount(labels.ravel(), grid_cols.ravel(), num + 1)[1:] / areas
    centroid_rows, centroid_cols = centroid_rows + window_top, centroid_cols + window_left
    # a cell touching a window edge that is not the slide's border may continue beyond it
    edges = np.zeros(labels.shape, bool)
    if window_top > 0:
        edges[0] = True
    if window_left > 0:
        edges[:, 0] = True
    if window_top + labels.shape[0] < shape[0]:
        edges[-1] = True
    if window_left + labels.shape[1] < shape[1]:
        edges[:, -1] = True
    cut = np.bincount(labels[edges], minlength=num + 1)[1:] > 0
    own = ((row_span[0] <= centroid_rows) & (centroid_rows < row_span[1])
           & (col_span[0] <= centroid_cols) & (centroid_cols < col_span[1]))
    return np.stack([centroid_rows, centroid_cols, areas, cut], axis=1)[own]


def gather_cells(per_chunk) -> SlideCellCount:
    """The per-chunk cell tables of :func:`cell_tasks` as one :class:`SlideCellCount`."""
    cells = np.concatenate([np.zeros((0, 4)), *per_chunk])
    cells = cells[np.lexsort((cells[:, 1], cells[:, 0]))]
    if cells[:, 3].any():
        warnings.warn(f"{int(cells[:, 3].sum())} cell(s) or groups of touching cells are "
                      "larger than the counting halo (cell_size) and may be split or counted "
                      "twice; use a larger cell_size", stacklevel=3)
    return SlideCellCount(len(cells), cells[:, :2].copy(), cells[:, 2].astype(np.int64))


# --- running: local scheduler or a dask.distributed cluster, with progress -------------------


def compute_chunks(tasks: list, description: str, progress: bool) -> list:
    """Compute a list of per-chunk delayed tasks with a tqdm bar over the chunks, on the
    active ``dask.distributed`` client if there is one, else on Dask's local scheduler."""
    import dask
    from tqdm.auto import tqdm

    client = _active_client()
    bar = tqdm(total=len(tasks), desc=description, unit="chunk", disable=not progress)
    with bar:
        if client is not None:
            from distributed import as_completed

            futures = client.compute(tasks)
            for _ in as_completed(futures):
                bar.update()
            return client.gather(futures)
        from dask.callbacks import Callback

        keys = {task.key for task in tasks}

        class ChunkProgress(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                if key in keys:
                    bar.update()

        with ChunkProgress():
            return list(dask.compute(*tasks))


def _active_client():
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:  # no client: Dask's local scheduler
        return None


def write_probabilities(probabilities, path, *, dtype="float16", progress: bool = False):
    """Stream lazy probabilities (C, H, W) to a Zarr store at ``path``, chunk by chunk,
    as float16 or as uint8 (probability * 255, rounded). The store is written next to
    ``path`` and moved there when complete, so ``path`` never holds a partial result.
    Returns the Zarr array."""
    import shutil
    import tempfile

    import dask
    import zarr

    if dtype not in ("float16", "uint8"):
        raise SlideError(f"dtype must be 'float16' or 'uint8', got {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-", suffix=".zarr"))
    try:
        rows, cols = probabilities.chunks[1:]
        target = zarr.create_array(store=str(temporary), shape=probabilities.shape, dtype=dtype,
                                   chunks=(probabilities.shape[0], rows[0], cols[0]),
                                   overwrite=True)
        blocks = probabilities.to_delayed()
        row_starts, col_starts = np.cumsum((0,) + rows), np.cumsum((0,) + cols)
        store = dask.delayed(_store_chunk, pure=True)
        tasks = [store(blocks[0, i, j], target,
                       (slice(None), slice(row_starts[i], row_starts[i + 1]),
                        slice(col_starts[j], col_starts[j + 1])),
                       dask_key_name=f"store-chunk-{probabilities.name}-{i}-{j}")
                 for i in range(len(rows)) for j in range(len(cols))]
        compute_chunks(tasks, "predicting", progress)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return zarr.open_array(str(path), mode="r")


def _store_chunk(block, target, region):
    """Write one chunk; each chunk covers whole Zarr chunks, so no two tasks share one."""
    if target.dtype == np.uint8:
        block = np.round(np.clip(block, 0, 1) * 255)
    target[region] = block.astype(target.dtype)
    return None
