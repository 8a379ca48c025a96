"""Settings of the whole process that minunet holds at a value while it computes.

Two of the libraries underneath keep a setting for the whole process rather than for a
thread: how many threads OpenBLAS runs a product on (:func:`minunet.functional.blas.
single_threaded_blas`) and whether NumPy asks the operating system for huge pages
(:func:`without_huge_pages`). Several threads may hold such a setting at once (the shares of
:class:`minunet.parallel.BatchSplit`), so :class:`HeldSetting` counts the blocks that are
open and restores the value the first one found when the last one ends.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np


class HeldSetting:
    """A process-wide setting, read by ``get()`` and written by ``set_(value)``, held at
    ``value`` while any :meth:`held` block (in any thread) is open."""

    def __init__(self, get, set_, value):
        self._get, self._set, self._value = get, set_, value
        self._open_blocks = 0
        self._saved = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def held(self):
        with self._lock:
            if self._open_blocks == 0:
                self._saved = self._get()
                self._set(self._value)
            self._open_blocks += 1
        try:
            yield
        finally:
            with self._lock:
                self._open_blocks -= 1
                if self._open_blocks == 0:
                    self._set(self._saved)


def _numpy_huge_page_advice() -> HeldSetting | None:
    """NumPy's switch for its huge-page advice, off while held; None where this NumPy has
    none (it is private: present from NumPy 1.20 on Linux builds)."""
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
    get = getattr(multiarray, "_get_madvise_hugepage", None)
    set_ = getattr(multiarray, "_set_madvise_hugepage", None)
    return None if get is None or set_ is None else HeldSetting(get, set_, False)


_HUGE_PAGE_ADVICE = _numpy_huge_page_advice()


@contextlib.contextmanager
def without_huge_pages():
    """A block (or, as ``@without_huge_pages()``, a function) in which NumPy takes memory for
    new arrays in the operating system's ordinary pages.

    For every array of 4 MiB or more NumPy asks Linux for 2 MiB huge pages
    (``madvise(MADV_HUGEPAGE)``). Where transparent huge pages are on request only, Linux's
    default on Debian and Ubuntu, the kernel then *compacts* memory on the spot to find free
    huge pages, and the longer the machine has run, the longer that takes. A network's
    feature maps larger than the C library keeps for reuse (tens of MiB, as on the paper's
    572x572 tiles) are fresh memory at every step, so the stall comes back at every step:
    on two cores a training step of the paper's U-Net took 5.0-6.6 s (median 6.1 s) with the
    advice and 5.1-5.2 s without it, the difference all in the kernel's time. The kernels
    gain nothing measurable from huge pages: their own time was the same.
    """
    if _HUGE_PAGE_ADVICE is None:
        yield
        return
    with _HUGE_PAGE_ADVICE.held():
        yield
