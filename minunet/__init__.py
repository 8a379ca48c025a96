"""minunet: U-Net image segmentation with every kernel written from scratch.

The package is layered, and data flows one way through it::

    minunet.shapes, minunet.checks (shape arithmetic, argument checks)
           -> minunet.cuda (CUDA kernels), minunet.functional (kernels: forward/backward pairs)
           -> minunet.nn (layers holding parameters)
           -> minunet.UNet -> minunet.losses / minunet.optim
           -> minunet.train, minunet.predict, minunet.slides (whole slides on Dask),
              the command line (python -m minunet)

NumPy or CuPy is chosen by the type of the arrays (see :mod:`minunet.backend`).
Top-level names are imported lazily, so ``import minunet`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "UNet": "minunet.unet",
    "save": "minunet.serialization",
    "load": "minunet.serialization",
    "predict": "minunet.inference",
    "count_cells": "minunet.inference",
    "pretrained": "minunet.zoo",
    "list_pretrained": "minunet.zoo",
    "model_card": "minunet.zoo",
}
_SUBMODULES = {
    "backend", "shapes", "checks", "files", "functional", "nn", "unet", "losses", "optim",
    "serialization", "data", "metrics", "inference", "postprocess", "slides", "train", "cuda",
    "torch_reference", "cli", "zoo", "results", "book",
}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"minunet.{name}")
    raise AttributeError(f"module 'minunet' has no attribute {name!r}")


def __dir__():
    return __all__
