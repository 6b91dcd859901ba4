"""avmt.bench.search: the largest-batch search against fake predicates."""

from __future__ import annotations

import math

import pytest

from avmt.bench.search import largest_fitting_batch


# -- largest batch -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 5, 7, 8, 9, 100, 1000, 4096])
@pytest.mark.parametrize("start", [1, 4, 64])
def test_largest_fitting_batch(threshold, start):
    calls: list[int] = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= threshold

    best, trials = largest_fitting_batch(fits, start=start, limit=4096)
    assert best == min(threshold, 4096)
    assert len(calls) == len(set(calls)) == len(trials)  # no batch tried twice
    assert trials == [(b, b <= threshold) for b in calls]
    assert len(calls) <= 2 * math.ceil(math.log2(4096)) + 2


def test_largest_fitting_batch_stops_at_the_limit_and_checks_arguments():
    best, trials = largest_fitting_batch(lambda b: True, start=3, limit=20)
    assert best == 20 and trials[-1] == (20, True)
    with pytest.raises(ValueError):
        largest_fitting_batch(lambda b: True, start=0)
    with pytest.raises(ValueError):
        largest_fitting_batch(lambda b: True, start=8, limit=4)
