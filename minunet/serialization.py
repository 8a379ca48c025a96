"""Saving and loading U-Nets, and converting weights to and from PyTorch.

A checkpoint is one ``.npz`` file (NumPy's zip of arrays) holding

* ``__config__``: the constructor arguments of :class:`minunet.UNet` as a JSON string,
* ``__format__``: the checkpoint format version,
* one array per state-dict entry (weights, biases, BatchNorm buffers), keyed by the dotted
  names of :meth:`minunet.nn.Module.state_dict`, the same names PyTorch uses for
  :class:`minunet.torch_reference.TorchUNet`.

Files are written with :func:`minunet.files.atomic_write` (a temporary file renamed over the
target), so a crash never leaves a half-written checkpoint; they are read with
``allow_pickle=False``, so loading a file cannot run code.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from minunet.backend import to_numpy
from minunet.files import atomic_write
from minunet.unet import UNet

FORMAT_VERSION = 1
_CONFIG_KEY = "__config__"
_FORMAT_KEY = "__format__"
# What a training checkpoint adds to a model file (written and read by minunet.train).
TRAINING_PREFIXES = ("optimizer/", "best/")
TRAINING_KEY = "__training__"


def save(net, path, *, storage_dtype: str | None = None, training: dict | None = None) -> None:
    """Write ``net`` (a :class:`minunet.UNet`, on any device) to ``path`` atomically.

    ``storage_dtype="float16"`` stores the floating-point weights and buffers at half
    precision (half the file size; :func:`load` casts them back to the network's dtype).
    ``training``: the extra entries of a training checkpoint (see :mod:`minunet.train`),
    arrays whose names start with one of ``TRAINING_PREFIXES`` and the JSON string
    ``TRAINING_KEY``; a checkpoint is a model file that also holds them, so :func:`load`
    reads either.
    """
    path = os.fspath(path)
    arrays = {name: to_numpy(value) for name, value in net.state_dict().items()}
    if storage_dtype is not None:
        if storage_dtype not in ("float16", "float32", "float64"):
            raise ValueError(f"storage_dtype must be 'float16', 'float32' or 'float64', got "
                             f"{storage_dtype!r}")
        arrays = {name: value.astype(storage_dtype) if value.dtype.kind == "f" else value
                  for name, value in arrays.items()}
    for name in training or {}:
        if name != TRAINING_KEY and not name.startswith(TRAINING_PREFIXES):
            raise ValueError(f"training entry {name!r} must start with one of "
                             f"{TRAINING_PREFIXES} or be {TRAINING_KEY!r}")
    arrays.update(training or {})
    arrays[_CONFIG_KEY] = np.array(json.dumps(net.config))
    arrays[_FORMAT_KEY] = np.array(FORMAT_VERSION)
    atomic_write(path, lambda stream: np.savez(stream, **arrays))


def read(path) -> tuple[dict, dict, dict]:
    """``(config, state, training)`` of a file written by :func:`save`: the network's
    configuration, its state dict (NumPy arrays) and the training entries (empty for a
    plain model file). ``ValueError`` for a file that is not a minunet checkpoint."""
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{path} is not a readable minunet checkpoint (.npz): {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a single array saved with np.save
        raise ValueError(f"{path} holds a single array ({archive.dtype}, shape "
                         f"{archive.shape}), not a minunet checkpoint (an .npz written by "
                         f"minunet.save or 'python -m minunet train')")
    try:
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{path} is not a readable minunet checkpoint (.npz): {exc}") from exc
    if _CONFIG_KEY not in arrays or _FORMAT_KEY not in arrays:
        raise ValueError(f"{path} is an .npz file but not a minunet checkpoint "
                         f"(no {_CONFIG_KEY!r}/{_FORMAT_KEY!r} entries)")
    version = int(arrays.pop(_FORMAT_KEY))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {version}, this minunet reads "
                         f"format {FORMAT_VERSION}")
    try:
        config = json.loads(str(arrays.pop(_CONFIG_KEY)))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} has an invalid network configuration: {exc}") from exc
    training = {name: arrays.pop(name) for name in list(arrays)
                if name == TRAINING_KEY or name.startswith(TRAINING_PREFIXES)}
    return config, arrays, training


def load(path):
    """Read a model file or training checkpoint written by :func:`save` and return the
    :class:`minunet.UNet` (NumPy arrays; call ``.to("cupy")`` to move it).

    Raises ``ValueError`` for a file that is not a minunet checkpoint, a corrupt file, or
    weights that are missing or do not fit the stored configuration.
    """
    config, state, _ = read(path)
    try:
        net = UNet(**config)
    except TypeError as exc:
        raise ValueError(f"{path} has an invalid network configuration: {exc}") from exc
    net.load_state_dict(state)  # ValueError on missing/unexpected keys or wrong shapes
    return net


def to_torch_state_dict(net) -> dict:
    """``net``'s weights and buffers as a PyTorch state dict for
    :class:`minunet.torch_reference.TorchUNet` (same keys; CPU tensors, copies)."""
    import torch

    return {name: torch.from_numpy(np.array(to_numpy(value)))
            for name, value in net.state_dict().items()}


def from_torch_state_dict(state_dict: dict, **config):
    """A :class:`minunet.UNet` built with ``config`` (the UNet constructor's arguments)
    holding the weights of a :class:`~minunet.torch_reference.TorchUNet` state dict."""
    net = UNet(**config)
    net.load_state_dict({name: value.detach().cpu().numpy()
                         for name, value in state_dict.items()})
    return net
