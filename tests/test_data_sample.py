"""avmt.data.sample: the retry-and-replace loop both loaders use."""

from __future__ import annotations

import pytest

from avmt.data.sample import SampleError, load_with_retries, replacement_index

RECORDS = [{"path": f"v{i}.mp4"} for i in range(10)]


def test_failing_rows_are_replaced_by_seeded_draws_and_counted():
    tried = []

    def load(idx, rng):
        tried.append(idx)
        if len(tried) < 3:
            raise OSError("unreadable")
        return f"row {idx}"

    out, failed = load_with_retries(load, 4, RECORDS, seed=7, epoch=2, train=True, max_retries=5)
    assert failed == 2 and tried[0] == 4
    assert tried[1:] == [replacement_index(7, 2, 4, 0, 10), replacement_index(7, 2, 4, 1, 10)]
    assert out == f"row {tried[2]}"


def test_eval_mode_gets_no_rng_and_too_many_failures_raise_with_the_last_error():
    rngs = []

    def load(idx, rng):
        rngs.append(rng)
        raise ValueError(f"bad {idx}")

    with pytest.raises(SampleError, match=r"3 samples in a row failed to load, the last with ValueError: bad \d"):
        load_with_retries(load, 0, RECORDS, seed=0, epoch=0, train=False, max_retries=3)
    assert rngs == [None, None, None]
