"""Pretrained U-Nets shipped with minunet, each trained by minunet itself.

Every model is a checkpoint in ``minunet/models/<name>.npz`` (weights stored at half
precision) with its model card next to it: ``<name>.json`` (machine-readable: data and
split, the exact training command, seed, training time, commit, test scores) and
``<name>.md`` (the same, to read). ::

    net = minunet.pretrained("isbi2012")      # EM membranes: class 1 = cell interior
    prob = minunet.predict(net, image)        # image: float (H, W) in [0, 1]
"""

from __future__ import annotations

import json
from pathlib import Path

from minunet.serialization import load

MODELS = Path(__file__).resolve().parent / "models"


def list_pretrained() -> list[str]:
    """Names of the shipped pretrained models (those with weights and a model card)."""
    return sorted(path.stem for path in MODELS.glob("*.npz")
                  if path.with_suffix(".json").is_file())


def _path(name: str, suffix: str) -> Path:
    if not isinstance(name, str) or name not in list_pretrained():
        raise ValueError(f"unknown pretrained model {name!r}; available: "
                         f"{', '.join(list_pretrained()) or 'none'}")
    return MODELS / f"{name}{suffix}"


def pretrained(name: str):
    """The pretrained :class:`minunet.UNet` called ``name`` (see :func:`list_pretrained`),
    in evaluation mode, float32, on the CPU."""
    net = load(_path(name, ".npz"))
    net.eval()
    return net


def model_card(name: str) -> dict:
    """The model card of ``name``: how it was trained and how it scores."""
    return json.loads(_path(name, ".json").read_text())
