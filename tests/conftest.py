"""Shared fixtures and markers for the test suite."""

from __future__ import annotations

import contextlib
import signal

import numpy as np
import pytest

from minunet.backend import gpu_available


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip themselves on machines without CuPy and a GPU."""
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A seeded generator, so every failure can be replayed."""
    return np.random.default_rng(20150518)  # the U-Net paper's arXiv date


@pytest.fixture
def time_limit():
    """``with time_limit(seconds):`` raises TimeoutError if the block runs longer, so a test of
    something that used to hang fails instead of hanging the suite."""

    @contextlib.contextmanager
    def limit(seconds: int):
        def expire(signum, frame):
            raise TimeoutError(f"still running after {seconds} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return limit
