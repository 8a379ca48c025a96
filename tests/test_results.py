"""minunet.results: the committed benchmark results, as the installed package sees them."""

import json
from pathlib import Path

import pytest

from minunet import results

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_every_committed_result_is_readable_from_the_package():
    committed = sorted(p.stem for p in RESULTS.glob("*.json"))
    assert results.names() == committed
    for name in committed:
        assert results.load(name) == json.loads((RESULTS / f"{name}.json").read_text())


def test_names_filters_and_missing_results_are_none():
    assert all(n.startswith("segmentation") for n in results.names("segmentation*"))
    assert results.load("no_such_result") is None


@pytest.mark.parametrize("bad", ["", "../pyproject", 3])
def test_bad_names_are_refused_with_one_line(bad):
    with pytest.raises(ValueError, match="name must be"):
        results.load(bad)
