"""The committed benchmark results, readable wherever the package is installed.

The benchmark scripts of the repository write their figures to ``benchmarks/results/*.json``;
the package ships the same files as package data (``minunet/benchmark_results`` points at
that folder), so a chapter of the book reads them from the installed package, also in a
notebook opened far from the repository::

    from minunet import results
    results.names("segmentation_*")      # ['segmentation_dsb2018', ...]
    results.load("unet_step_cpu")        # the parsed JSON, or None when it is absent
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "benchmark_results"


def names(pattern: str = "*") -> list[str]:
    """Sorted names (file stems) of the result files that match the glob ``pattern``."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty glob string, got {pattern!r}")
    return sorted(path.stem for path in FOLDER.glob(f"{pattern}.json"))


def load(name: str) -> dict | None:
    """The result ``name`` (e.g. ``"kernels_cpu"``) as a dict, or None if it is not there."""
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"name must be a result file stem such as 'kernels_cpu', got {name!r}")
    path = FOLDER / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
