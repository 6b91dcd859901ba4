"""Guards: what training computes, and which checkpoints load, cannot change without a test noticing.

- Reference loss trajectories (tests/guards.py): the tiny preset's first 30 steps for each sharing scheme, at 1 and
  2 threads, each equal to the committed numbers of its thread count bit for bit (docs/training.md, "Determinism").
  A deliberate numerics change regenerates them with ``python tests/guards.py`` in the same commit.
"""

from __future__ import annotations

import json

import pytest
from guards import SCHEMES, STEPS, THREADS, fixture_path, guard_manifest, trajectory


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return guard_manifest(tmp_path_factory.mktemp("guard"))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_loss_trajectory_is_the_committed_one(manifest, tmp_path, scheme, threads):
    want = json.loads(fixture_path(scheme).read_text())["threads"][str(threads)]
    got = trajectory(manifest, tmp_path, scheme, threads)
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert g == w, (
            f"{scheme}, {threads} thread(s): step {step} differs from {fixture_path(scheme).name}: "
            + ", ".join(f"{k} {w.get(k)!r} -> {g.get(k)!r}" for k in sorted(set(g) | set(w)) if g.get(k) != w.get(k))
            + " (a deliberate change: regenerate with python tests/guards.py and say why in the commit)"
        )
