"""Work shared out to threads, each running BLAS on one thread.

BLAS spreads a single matrix product over its threads; NumPy runs everything else (copies,
elementwise passes) on one. A kernel that makes many products and copies can instead give
each thread its own share of the work, products and copies together, with BLAS kept to one
thread per product: then every core is busy all the time, not only during the products.
Two threads of NumPy next to OpenBLAS's own threads would gain nothing: after a product
OpenBLAS's threads keep spinning for a while, waiting for the next one, and take the cores.

:func:`run_at_once` runs such shares; :func:`share_count` says how many to make (as many as
BLAS would use, so a limit set with ``threadpoolctl`` holds here too); :func:`split` cuts a
range into contiguous runs. Within a share the count is 1, so work nested inside a share
(a kernel called by a thread of :class:`minunet.parallel.BatchSplit`) runs serially.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from minunet.functional.blas import blas_threads, single_threaded_blas

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_share = threading.local()  # .running: this thread is running a share right now


def share_count() -> int:
    """How many threads to share work out to: as many as BLAS runs a product on (1 within
    a share)."""
    return 1 if getattr(_share, "running", False) else blas_threads()


def split(total: int, parts: int) -> list[slice]:
    """``range(total)`` cut into at most ``parts`` contiguous runs of about equal length
    (no empty run)."""
    parts = max(1, min(parts, total))
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def runs_by_size(sizes, parts: int) -> list[slice]:
    """Items of these ``sizes`` cut into at most ``parts`` runs of consecutive items, each
    run holding about an equal share of the total size (no empty run): the parameters of a
    network dealt out to threads, where each weight is one pass over memory."""
    sizes = list(sizes)
    total = sum(sizes)
    parts = max(1, min(parts, len(sizes)))
    runs, start, done = [], 0, 0
    for index, size in enumerate(sizes):
        done += size
        # close the run when its share is reached, keeping an item for each run still to come
        if (len(runs) < parts - 1 and done * parts >= total * (len(runs) + 1)
                and len(sizes) - index - 1 >= parts - len(runs) - 1):
            runs.append(slice(start, index + 1))
            start = index + 1
    runs.append(slice(start, len(sizes)))
    return runs


def _workers(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(count, thread_name_prefix="minunet")
            _pool_size = count
        return _pool


def _as_share(task):
    def run():
        _share.running = True
        try:
            return task()
        finally:
            _share.running = False
    return run


def run_at_once(tasks) -> list:
    """Call every task (no arguments) at the same time, the first in this thread and each
    other in a worker thread, with BLAS on one thread; their results, in order. Waits for
    every task before raising the first error. One task, or tasks given from within a
    share, run one after the other here, as they are."""
    tasks = list(tasks)
    if len(tasks) == 1 or getattr(_share, "running", False):
        return [task() for task in tasks]
    pool = _workers(len(tasks) - 1)
    with single_threaded_blas():
        futures = [pool.submit(_as_share(task)) for task in tasks[1:]]
        try:
            first = _as_share(tasks[0])()
        finally:
            errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
    return [first, *(future.result() for future in futures)]


# An elementwise pass is shared out only from this many elements on (a pass of about 1 ms):
# below, starting the threads (about 0.1 ms for two) takes too large a part of the gain.
ELEMENTWISE_MIN_SIZE = 2**20


def pass_shares(size: int) -> int:
    """How many shares to deal a pass over ``size`` elements out to: :func:`share_count`,
    or 1 below :data:`ELEMENTWISE_MIN_SIZE`."""
    return share_count() if size >= ELEMENTWISE_MIN_SIZE else 1


def elementwise(function, *arrays) -> None:
    """``function(*parts)`` on matching runs of the flattened ``arrays`` (C-contiguous, of
    one size), one run per share of the work, all at once: an elementwise pass that writes
    into one of them, on every core instead of one."""
    size = arrays[0].size
    shares = pass_shares(size)
    flat = [a.reshape(-1) for a in arrays]
    run_at_once(lambda run=run: function(*(a[run] for a in flat)) for run in split(size, shares))
