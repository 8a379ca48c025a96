"""Synthetic fluorescence-microscopy images of cells, with exact instance labels.

The generator draws cells as perturbed ellipses, packs them so that many touch their
neighbours, and then imitates what a microscope does to them:

1. every cell gets its own brightness, a dome-shaped profile (brighter in the middle, so two
   touching cells show a faint valley between them, as real nuclei do) and a grainy texture;
2. the optics blur the scene (a Gaussian point-spread function);
3. the illumination is uneven (a smooth multiplicative field, brighter on one side);
4. the camera adds shot noise (Poisson, ``photons`` per unit intensity) and read noise
   (Gaussian).

Every image is seeded, so a test, a chapter of the book and a benchmark see the same data.
``synthetic_cells(n, seed=s)[i]`` does not depend on ``n``: image ``i`` has its own child seed.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage

from minunet.shapes import pair

# A cell is accepted if it keeps at least this fraction of its area after the cells painted
# before it (which lie on top) have covered part of it.
_MIN_VISIBLE_FRACTION = 0.6


def _generator(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (numbers.Integral, np.random.SeedSequence)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an int, a SeedSequence, a Generator or None, got {seed!r}")


def _cell_mask(shape, center, radius, rng):
    """Boolean mask of one perturbed ellipse, and the bounding box it lives in.

    The boundary in polar form is ``rho(phi) = 1 + sum_k a_k cos(k phi + p_k)`` (k = 2..4,
    a few percent each) in the ellipse's own normalised coordinates, which gives blobs rather
    than perfect ellipses. Returns ``(mask, rho_squared, (row_slice, col_slice))`` with
    ``rho_squared`` the normalised squared radius used for the intensity profile.
    """
    elongation = rng.uniform(0.0, 0.35)
    semi_a, semi_b = radius * (1 + elongation), radius * (1 - elongation / 2)
    angle = rng.uniform(0, np.pi)
    reach = int(np.ceil(semi_a * 1.2)) + 1
    r0, c0 = (max(int(np.floor(center[i])) - reach, 0) for i in range(2))
    r1 = min(int(np.ceil(center[0])) + reach + 1, shape[0])
    c1 = min(int(np.ceil(center[1])) + reach + 1, shape[1])
    rows, cols = np.ogrid[r0:r1, c0:c1]
    dy, dx = rows - center[0], cols - center[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / semi_a
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / semi_b
    rho_squared = u**2 + v**2
    phi = np.arctan2(v, u)
    boundary = np.ones_like(phi)
    for k in (2, 3, 4):
        boundary += rng.uniform(0.0, 0.06) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    mask = rho_squared < boundary**2
    return mask, rho_squared / boundary**2, (slice(r0, r1), slice(c0, c1))


def _smooth_noise(shape, sigma, rng):
    """White noise low-pass filtered with a Gaussian of ``sigma`` px, rescaled to unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / max(field.std(), 1e-12)


def synthetic_cell_image(
    size=256,
    *,
    seed=None,
    num_cells: int | None = None,
    radius_range: tuple[float, float] = (7.0, 14.0),
    coverage: float = 0.3,
    touching_fraction: float = 0.5,
    brightness_range: tuple[float, float] = (0.35, 1.0),
    background: float = 0.08,
    texture: float = 0.15,
    blur_sigma: float = 1.0,
    illumination: float = 0.35,
    photons: float = 300.0,
    read_noise: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic microscopy image and its instance labels.

    Parameters
    ----------
    size : int or (H, W)
        Image size in pixels.
    seed : int, SeedSequence, Generator or None
        Source of randomness (a Generator is used, and advanced, as given).
    num_cells : int, optional
        Number of cells to try to place. Default: a Poisson draw with mean
        ``coverage * H * W / (pi * mean_radius**2)``. Cells that would be mostly hidden by
        earlier ones are dropped, so the final count can be lower.
    radius_range : (min, max)
        Range of the mean cell radius in pixels.
    touching_fraction : float in [0, 1]
        Probability that a cell is placed against an existing one (centre distance
        0.8-1.0 times the sum of radii) instead of at a free random spot.
    brightness_range, background, texture, blur_sigma, illumination, photons, read_noise
        Appearance: cell brightness range, background level, relative std of the interior
        texture, Gaussian blur (px), strength of the uneven illumination (0 = flat),
        expected photon count at intensity 1 (shot noise), std of the Gaussian read noise.

    Returns
    -------
    image : float32 (H, W) in [0, 1]
    labels : int32 (H, W); 0 is background, cells are 1..K (K = number of cells), each one
        connected region.
    """
    rng = _generator(seed)
    shape = pair(size, "size", minimum=8)
    low_r, high_r = radius_range
    if not 0 < low_r <= high_r:
        raise ValueError(f"radius_range must be (min, max) with 0 < min <= max, got {radius_range}")
    if not 0.0 <= touching_fraction <= 1.0:
        raise ValueError(f"touching_fraction must be in [0, 1], got {touching_fraction}")
    if num_cells is None:
        mean_area = np.pi * ((low_r + high_r) / 2) ** 2
        num_cells = int(rng.poisson(coverage * shape[0] * shape[1] / mean_area))
    elif num_cells < 0:
        raise ValueError(f"num_cells must be >= 0, got {num_cells}")

    labels = np.zeros(shape, np.int32)
    signal = np.zeros(shape, np.float64)
    centers: list[np.ndarray] = []
    radii: list[float] = []
    texture_field = _smooth_noise(shape, 1.5, rng)
    for _ in range(num_cells):
        radius = rng.uniform(low_r, high_r)
        center = None
        for _attempt in range(20):
            if centers and rng.random() < touching_fraction:
                j = rng.integers(len(centers))
                direction = rng.uniform(0, 2 * np.pi)
                distance = (radii[j] + radius) * rng.uniform(0.8, 1.0)
                candidate = centers[j] + distance * np.array([np.sin(direction), np.cos(direction)])
            else:
                candidate = rng.uniform((0, 0), shape)
            if not (0 <= candidate[0] < shape[0] and 0 <= candidate[1] < shape[1]):
                continue
            gaps = [np.hypot(*(candidate - c)) / (r + radius)
                    for c, r in zip(centers, radii, strict=True)]
            if not gaps or min(gaps) >= 0.8:  # never bury a cell under another one
                center = candidate
                break
        if center is None:
            continue
        mask, rho_squared, box = _cell_mask(shape, center, radius, rng)
        visible = mask & (labels[box] == 0)  # earlier cells lie on top
        if visible.sum() < _MIN_VISIBLE_FRACTION * max(mask.sum(), 1):
            continue
        pieces, num_pieces = ndimage.label(visible)
        if num_pieces != 1:  # the cell must be one region, or it would count twice
            continue
        label = len(centers) + 1
        centers.append(center)
        radii.append(radius)
        labels[box][visible] = label
        brightness = rng.uniform(*brightness_range)
        dome = brightness * (1 - 0.35 * np.clip(rho_squared, 0, 1))
        grain = 1 + texture * texture_field[box]
        signal[box][visible] = (dome * grain)[visible]

    # Cells can fall partly outside the image; relabel 1..K in order of appearance.
    present = np.unique(labels)
    present = present[present > 0]
    lookup = np.zeros(len(centers) + 1, np.int32)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    labels = lookup[labels]

    image = background + signal
    image = ndimage.gaussian_filter(image, blur_sigma) if blur_sigma > 0 else image
    if illumination > 0:
        rows, cols = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
        tilt = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(tilt) * rows + np.sin(tilt) * cols  # in [-sqrt2, sqrt2]
        image = image * (1 - illumination * (0.5 - 0.5 * ramp / np.sqrt(2)))
    if photons > 0:
        image = rng.poisson(np.clip(image, 0, None) * photons) / photons
    if read_noise > 0:
        image = image + rng.normal(0.0, read_noise, shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def synthetic_cells(n: int, size=256, *, seed=0, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic images and their instance labels (see :func:`synthetic_cell_image`).

    Returns ``images`` float32 (n, H, W) in [0, 1] and ``labels`` int32 (n, H, W). Image ``i``
    is drawn from the ``i``-th child of ``SeedSequence(seed)``, so it is the same whatever
    ``n`` is.
    """
    if not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, np.random.Generator):
        raise TypeError("seed must be an int or a SeedSequence here (each image gets a child)")
    shape = pair(size, "size", minimum=8)
    images = np.empty((n, *shape), np.float32)
    labels = np.empty((n, *shape), np.int32)
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        images[i], labels[i] = synthetic_cell_image(shape, seed=child, **kwargs)
    return images, labels
