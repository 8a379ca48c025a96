"""Writing results: probability maps and label images by file type, and overlay figures.

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
    figure.tight_layout()
    try:
        atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=100))
    finally:
        plt.close(figure)
