"""minunet.functional.threads: runs of work, shares run at once, errors, BLAS's count."""

from __future__ import annotations

import threading

import pytest

from minunet.functional import blas, threads


@pytest.mark.parametrize(("total", "parts"), [(10, 3), (3, 8), (7, 7), (1, 2), (100, 1)])
def test_split_covers_the_range_in_contiguous_nonempty_runs(total, parts):
    runs = threads.split(total, parts)
    assert len(runs) == min(total, parts)
    covered = [i for run in runs for i in range(total)[run]]
    assert covered == list(range(total))
    lengths = [run.stop - run.start for run in runs]
    assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize(("sizes", "parts"), [([5, 1, 1, 1, 1, 1], 2), ([1] * 7, 3),
                                             ([9, 9], 5), ([4], 2), ([1, 1, 8, 1, 1], 3)])
def test_runs_by_size_are_consecutive_nonempty_and_about_equal(sizes, parts):
    runs = threads.runs_by_size(sizes, parts)
    assert len(runs) == min(parts, len(sizes))
    assert [i for run in runs for i in range(len(sizes))[run]] == list(range(len(sizes)))
    totals = [sum(sizes[run]) for run in runs]
    # no run could hand its last item to the next one and come closer to an equal share
    share = sum(sizes) / len(runs)
    for run, total in zip(runs[:-1], totals[:-1], strict=True):
        assert run.stop > run.start and total - sizes[run.stop - 1] < share


def test_shares_run_at_once_on_different_threads_with_one_blas_thread():
    both_started = threading.Barrier(3, timeout=10)  # fails if the shares ran in turn

    def share(label):
        both_started.wait()
        return label, threading.get_ident(), blas.blas_threads(), threads.share_count()

    results = threads.run_at_once([lambda: share("a"), lambda: share("b"), lambda: share("c")])
    assert [r[0] for r in results] == ["a", "b", "c"]
    assert len({r[1] for r in results}) == 3
    assert all(r[2] == 1 and r[3] == 1 for r in results) or not blas.direct_gemm_available()


def test_work_given_from_within_a_share_runs_in_that_thread():
    def share():
        inner = threads.run_at_once([threading.get_ident, threading.get_ident])
        return threading.get_ident(), inner

    for outer, inner in threads.run_at_once([share, share]):
        assert inner == [outer, outer]


def test_an_error_in_any_share_is_raised_after_all_have_finished():
    finished = []

    def slow():
        threading.Event().wait(0.05)
        finished.append("slow")

    def failing():
        raise ArithmeticError("share 2 failed")

    before = blas.blas_threads()
    with pytest.raises(ArithmeticError, match="share 2 failed"):
        threads.run_at_once([slow, failing])
    assert finished == ["slow"]
    assert blas.blas_threads() == before
