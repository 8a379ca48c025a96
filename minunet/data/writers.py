"""Writing results: probability maps and label images by file type, overlay figures, and
the cells of a whole slide as CSV.

Every writer goes through :func:`minunet.files.atomic_write`, so an existing file is only
ever replaced by a complete one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minunet.files import atomic_write

ARRAY_SUFFIXES = (".npy", ".tif", ".tiff", ".png")


def check_array_suffix(path) -> None:
    """``ValueError`` unless :func:`write_array` knows the file type of ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise ValueError(f"{path}: unknown output type {suffix!r} (use .npy, .tif or .png)")


def write_array(path, array, *, kind: str) -> None:
    """Save ``array`` by the file's extension: ``.npy``, ``.tif``/``.tiff`` or ``.png``.

    ``kind="probabilities"`` (float in [0, 1]; a PNG gets the last channel as 8-bit gray) or
    ``"labels"`` (integers; a PNG gets 16-bit values).
    """
    check_array_suffix(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        atomic_write(path, lambda stream: np.save(stream, array))
    elif suffix in (".tif", ".tiff"):
        import tifffile

        data = array.astype(np.float32 if kind == "probabilities" else np.int32)
        atomic_write(path, lambda stream: tifffile.imwrite(stream, data))
    else:
        from PIL import Image

        if kind == "probabilities":
            data = np.round(np.clip(array[-1] if array.ndim == 3 else array, 0, 1) * 255)
            data = data.astype(np.uint8)
        else:
            if array.max(initial=0) > 65535:
                raise ValueError(f"{path}: more than 65535 labels do not fit a PNG; use .tif")
            data = array.astype(np.uint16)
        atomic_write(path, lambda stream: Image.fromarray(data).save(stream, format="PNG"))


def save_overlay(path, image, labels, title: str = "") -> None:
    """A PNG with the image on the left and the found cells' outlines on top of it on the
    right (matplotlib, Agg backend). ``image`` (H, W) or (C, H, W), ``labels`` int (H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    gray = image.mean(axis=0) if image.ndim == 3 else image
    outlines = (labels > 0) & (ndimage.grey_erosion(labels, size=(3, 3)) != labels)
    figure, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    axes[0].imshow(gray, cmap="gray")
    axes[0].set_title("image")
    axes[1].imshow(gray, cmap="gray")
    axes[1].imshow(np.ma.masked_where(~outlines, outlines), cmap="autumn", alpha=0.9,
                   interpolation="nearest")
    axes[1].set_title(title or f"{int(labels.max())} cells found")
    for axis in axes:
        axis.set_axis_off()
    save_figure(path, figure)


def save_figure(path, figure) -> None:
    """Write a matplotlib ``figure`` as PNG to ``path`` (atomically), then close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    try:
        atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=100))
    finally:
        plt.close(figure)


def write_centroids(path, found) -> None:
    """The cells a whole-slide count found (:class:`minunet.slides.SlideCellCount`) as CSV:
    one ``row,col,area`` line per cell, centroids in pixels."""
    rows = [f"{row:.3f},{col:.3f},{area}"
            for (row, col), area in zip(found.centroids, found.areas, strict=True)]
    text = "\n".join(["row,col,area", *rows]) + "\n"
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def save_slide_overlay(path, gray, found, title: str, edge: int = 1024) -> None:
    """A PNG of the slide shrunk to about ``edge`` px (every k-th pixel, read chunk by
    chunk) with a dot on every cell found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, -(-max(gray.shape) // edge))
    small = np.asarray(gray[::step, ::step].compute())
    figure, axis = plt.subplots(figsize=(8, 8 * small.shape[0] / small.shape[1] + 0.4))
    axis.imshow(small, cmap="gray", extent=(0, gray.shape[1], gray.shape[0], 0))
    axis.scatter(found.centroids[:, 1], found.centroids[:, 0], s=2, c="tab:orange",
                 linewidths=0)
    axis.set_title(f"{title}: {found.count} cells (shown 1:{step})")
    axis.set_axis_off()
    save_figure(path, figure)
