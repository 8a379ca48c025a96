"""Reading real microscopy data: image/mask folders, ISBI 2012 stacks, the DSB 2018 nuclei.

Every loader returns a :class:`Dataset`: lists of float32 images scaled to [0, 1], of integer
label images (instance labels, 0 = background), and of names. Lists rather than one array,
because real images rarely share a size.

Masks are checked: a mask must have the image's (H, W); a binary mask must have at most two
values; an empty mask (no foreground at all) triggers a warning, since training or evaluating
on it is allowed but usually a mistake (e.g. a 0/1 mask saved as 8-bit looks black).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from minunet.data.weights import instances_from_mask

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_SUFFIX = "_mask"


@dataclass
class Dataset:
    """Images, their instance labels and their names (all lists of the same length).

    ``images[i]`` float32 (H, W) or (C, H, W) in [0, 1]; ``labels[i]`` int32 (H, W),
    0 = background, 1..K = cells (or a single label 1 for every foreground pixel, when the
    source was a binary mask and ``instances=False``).
    """

    images: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    names: list = field(default_factory=list)

    def __post_init__(self):
        if not len(self.images) == len(self.labels) == len(self.names):
            raise ValueError("images, labels and names must have the same length")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Dataset(self.images[index], self.labels[index], self.names[index])
        return self.images[index], self.labels[index]


def read_image(path) -> np.ndarray:
    """The raw pixel array of an image file (TIFF through tifffile, the rest through Pillow).

    Raises ``FileNotFoundError`` or ``ValueError`` (unreadable file), naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        with Image.open(path) as handle:
            return np.asarray(handle)
    except Exception as exc:  # every reader has its own exception types
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def normalize_intensity(image, percentiles=(1.0, 99.8)) -> np.ndarray:
    """float32 copy of ``image`` with the given percentiles mapped to 0 and 1, clipped.

    Percentiles rather than min/max, so that a few hot pixels do not squash the contrast;
    8-bit images with a full range are hardly changed. Constant images map to 0.
    """
    image = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(image, percentiles)
    if high <= low:
        return np.zeros(image.shape, np.float32)
    return np.clip((image - low) / (high - low), 0, 1).astype(np.float32)


def is_colour(raw) -> bool:
    """True for a colour image as files store it, (H, W, 3) RGB or (H, W, 4) RGBA; a
    channels-first (C, H, W) array, such as a multi-page TIFF stack, is not one."""
    shape = np.shape(raw)
    return len(shape) == 3 and shape[-1] in (3, 4) and shape[0] not in (1, 3, 4)


def as_image(raw, name="image") -> np.ndarray:
    """Turn a raw pixel array into float32 (H, W) or (C, H, W) in [0, 1].

    Colour images (H, W, 3 or 4) become channels-first RGB (alpha dropped). NaN or infinite
    pixels (float TIFFs may mark missing data so) are refused: they have no place in [0, 1].
    """
    raw = np.asarray(raw)
    if is_colour(raw):
        raw = np.moveaxis(raw[..., :3], -1, 0)
    if raw.ndim not in (2, 3) or min(raw.shape[-2:]) < 1:
        raise ValueError(f"{name} must be a 2-D image (H, W) or (C, H, W), got shape {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
        raise TypeError(f"{name} must be numeric, got {raw.dtype}")
    if np.issubdtype(raw.dtype, np.inexact):
        not_finite = int(np.count_nonzero(~np.isfinite(raw)))
        if not_finite:
            raise ValueError(f"{name} has {not_finite} NaN or infinite pixel value(s); "
                             f"replace them before using the image")
    return normalize_intensity(raw)


def as_labels(raw, *, kind: str = "auto", image_shape=None, name: str = "mask") -> np.ndarray:
    """Check a mask and turn it into int32 instance labels (0 = background).

    kind
        ``"binary"``: at most two distinct values (0/1, 0/255, False/True); the foreground is
        split into 4-connected components, one label each. ``"instance"``: the values are
        already cell ids (0 = background). ``"classes"``: the values are class indices of a
        multi-class network (0 = background), kept as they are. ``"auto"``: binary if there
        are at most two values (a warning says so when the foreground value is not 1 or 255,
        e.g. a 0/128 mask), else instance.

    Raises ``ValueError`` when the mask is not 2-D, does not match ``image_shape`` (H, W), has
    more than two values while ``kind="binary"``, or has negative values; warns when it has no
    foreground.
    """
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):  # an RGB(A) mask saved in colour
        if not all(np.array_equal(raw[..., 0], raw[..., c]) for c in (1, 2)):
            raise ValueError(f"{name} is a colour image; expected a gray-level mask")
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {raw.shape}")
    if image_shape is not None and raw.shape != tuple(image_shape):
        raise ValueError(f"{name} has shape {raw.shape} but its image has (H, W) = {image_shape}")
    if not (np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool):
        if not np.all(raw == np.round(raw)):
            raise ValueError(f"{name} holds non-integer values; expected a label or binary mask")
        raw = raw.astype(np.int64)
    values = np.unique(raw)
    if values.size and values[0] < 0:
        raise ValueError(f"{name} has negative values; expected 0 = background")
    if kind == "auto":
        kind = "binary" if values.size <= 2 else "instance"
        if values.size == 2 and values[-1] not in (1, 255):
            # an instance mask with a single cell gives the same labels either way
            warnings.warn(f"{name} has the values 0 and {values[-1]} only: read as a binary "
                          f"mask ({values[-1]} = cells, split into connected components); "
                          f"pass kind='instance' if {values[-1]} is a cell id", stacklevel=2)
    if kind == "binary":
        if values.size > 2:
            raise ValueError(
                f"{name} should be binary but has {values.size} distinct values "
                f"({values[:5].tolist()}...); pass kind='instance' if it holds cell ids"
            )
        labels = instances_from_mask(raw > 0)
    elif kind in ("instance", "classes"):
        labels = raw.astype(np.int32)
    else:
        raise ValueError(f"kind must be 'binary', 'instance', 'classes' or 'auto', got {kind!r}")
    if not labels.any():
        warnings.warn(f"{name} has no foreground pixels (all background)", stacklevel=2)
    return labels


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _natural_key(path: Path):
    """Sort ``2.png`` before ``10.png``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem)]


def pair_image_masks(root) -> list[tuple[Path, Path]]:
    """Pairs ``(image path, mask path)`` in ``root``, by one of two rules:

    1. ``root/images/<stem>.<ext>`` with ``root/masks/<stem>.<ext'>`` (used whenever
       ``root/images`` exists);
    2. otherwise a flat folder: ``<stem>.<ext>`` with ``<stem>_mask.<ext'>``.

    Extensions may differ between an image and its mask (``.tif`` image, ``.png`` mask).
    Raises ``ValueError`` if an image has no mask, a stem is ambiguous, or nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such data folder: {root}")
    if (root / "images").is_dir():
        if not (root / "masks").is_dir():
            raise ValueError(f"{root / 'images'} exists but {root / 'masks'} does not")
        images, masks = _images_in(root / "images"), _images_in(root / "masks")
        mask_stem = {p.stem: p for p in masks}
        stem_of = {p: p.stem for p in images}
    else:
        files = _images_in(root)
        masks = [p for p in files if p.stem.endswith(MASK_SUFFIX)]
        images = [p for p in files if not p.stem.endswith(MASK_SUFFIX)]
        mask_stem = {p.stem[: -len(MASK_SUFFIX)]: p for p in masks}
        stem_of = {p: p.stem for p in images}
    if len(mask_stem) != len(masks) or len(set(stem_of.values())) != len(images):
        raise ValueError(f"{root}: two files share a name with different extensions")
    missing = [p.name for p in images if stem_of[p] not in mask_stem]
    if missing:
        raise ValueError(f"{root}: no mask for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    if not images:
        raise ValueError(
            f"{root}: no image/mask pairs found (expected images/ and masks/ folders, or "
            f"NAME.png with NAME{MASK_SUFFIX}.png)"
        )
    return [(p, mask_stem[stem_of[p]]) for p in sorted(images, key=_natural_key)]


def load_folder(root, *, kind: str = "auto") -> Dataset:
    """All image/mask pairs of ``root`` (pairing rule: :func:`pair_image_masks`; mask
    checks and ``kind``: :func:`as_labels`)."""
    data = Dataset()
    for image_path, mask_path in pair_image_masks(root):
        image = as_image(read_image(image_path), name=str(image_path))
        labels = as_labels(read_image(mask_path), kind=kind, image_shape=image.shape[-2:],
                           name=str(mask_path))
        data.images.append(image)
        data.labels.append(labels)
        data.names.append(image_path.stem)
    return data


def load_isbi2012(root) -> Dataset:
    """The ISBI 2012 EM segmentation training set.

    Two layouts are recognised in ``root``:

    * the challenge's multi-page TIFF stacks ``train-volume.tif`` and ``train-labels.tif``;
    * the PNG export ``train/image/N.png`` and ``train/label/N.png`` (sorted by N).

    Labels are 255 (cell interior) and 0 (membrane); the returned instance labels are the
    4-connected components of the cell interiors (so each neuron section is one "cell", and
    the membranes are background).
    """
    root = Path(root)
    volume, stack = root / "train-volume.tif", root / "train-labels.tif"
    if volume.is_file() and stack.is_file():
        images, masks = read_image(volume), read_image(stack)
        if images.ndim == 2:
            images, masks = images[None], masks[None]
        if images.shape != masks.shape:
            raise ValueError(f"{volume} has shape {images.shape} but {stack} has {masks.shape}")
        names = [f"{i}" for i in range(len(images))]
    elif (root / "train" / "image").is_dir() and (root / "train" / "label").is_dir():
        image_paths = sorted(_images_in(root / "train" / "image"), key=_natural_key)
        label_dir = root / "train" / "label"
        pairs = [(p, label_dir / p.name) for p in image_paths]
        missing = [p.name for p, q in pairs if not q.is_file()]
        if missing or not pairs:
            raise ValueError(f"{root}: missing labels for {missing[:5]}" if missing
                             else f"{root}: no images in train/image")
        images = [read_image(p) for p, _ in pairs]
        masks = [read_image(q) for _, q in pairs]
        names = [p.stem for p, _ in pairs]
    else:
        raise FileNotFoundError(
            f"{root}: expected train-volume.tif and train-labels.tif, or train/image/*.png "
            "and train/label/*.png (the ISBI 2012 training set)"
        )
    data = Dataset()
    for name, image, mask in zip(names, images, masks, strict=True):
        data.images.append(as_image(image, name=f"image {name}"))
        data.labels.append(as_labels(mask, kind="binary", image_shape=np.shape(image),
                                     name=f"label {name}"))
        data.names.append(name)
    return data


STARDIST_INSTALL = "pip install --no-deps stardist==0.9.2"


def dsb2018_nuclei_paths() -> tuple[Path, Path]:
    """Paths of the DSB 2018 nuclei image and its instance mask inside the ``stardist`` wheel.

    The package is located without importing it (its deep-learning dependencies are not
    needed here). Raises ``FileNotFoundError`` with the install command if it is missing.
    """
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the DSB 2018 nuclei image ships with the 'stardist' package, which is not "
            f"installed; install it (data only, no dependencies) with: {STARDIST_INSTALL}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "images"
    image, mask = folder / "img2d.tif", folder / "mask2d.tif"
    if not (image.is_file() and mask.is_file()):
        raise FileNotFoundError(
            f"stardist is installed but {image.name}/{mask.name} are missing from {folder}; "
            f"reinstall it with: {STARDIST_INSTALL}"
        )
    return image, mask


def load_dsb2018_nuclei() -> Dataset:
    """The fluorescence nuclei image (512 x 512) with 125 annotated nuclei from the 2018 Data
    Science Bowl (stage 1 training set), as distributed with StarDist (BSD-3-Clause).

    Returns a one-image :class:`Dataset` named ``"dsb2018_img2d"``.
    """
    image_path, mask_path = dsb2018_nuclei_paths()
    image = as_image(read_image(image_path), name=str(image_path))
    labels = as_labels(read_image(mask_path), kind="instance", image_shape=image.shape[-2:],
                       name=str(mask_path))
    return Dataset([image], [labels], ["dsb2018_img2d"])
