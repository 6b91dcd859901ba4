import itertools
import math

import numpy as np
import pytest
import torch

from avmt import backends
from avmt.backends import select_sampling
from avmt.sampling import MODES, sample_negatives

BACKENDS = ["reference", "cpp"]


def chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square statistic, df = cells - 1."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def draw(mode, backend, na=29, np_=131, d=19, k=7, dtype=torch.float32, seed=0, trim=0.025, groups=6):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(np_, d, generator=g).to(dtype)
    anchor_index = torch.randint(0, np_, (na,), generator=g)
    anchor_index[::5] = -1  # some anchors are not in the pool
    anchors = pool[anchor_index.clamp_min(0)] + 0.1 * torch.randn(na, d, generator=g).to(dtype)
    group = torch.randint(0, groups, (np_,), generator=g)
    anchor_group = torch.randint(0, groups, (na,), generator=g)
    out = sample_negatives(
        anchors,
        pool,
        k,
        mode=mode,
        trim=trim,
        anchor_index=anchor_index,
        group=group,
        anchor_group=anchor_group,
        generator=torch.Generator().manual_seed(seed + 1),
        backend=backend,
    )
    return out, anchors, pool, anchor_index, group, anchor_group


def trimmed_sets(anchors, pool, anchor_index, trim):
    """Independent float64 computation of which pool rows survive the trim, per anchor."""
    a, p = anchors.double().numpy(), pool.double().numpy()
    keep = []
    for i in range(len(a)):
        cand = [j for j in range(len(p)) if j != anchor_index[i]]
        dist = np.linalg.norm(p[cand] - a[i], axis=1)
        order = np.lexsort((cand, dist))
        t = math.floor(trim * len(cand))
        keep.append({cand[o] for o in order[t : len(cand) - t]})
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_properties(backend, mode, dtype):
    out, anchors, pool, anchor_index, group, anchor_group = draw(mode, backend, dtype=dtype, trim=0.05)
    assert out.dtype == torch.long and out.shape == (29, 7)
    assert ((out >= -1) & (out < 131)).all()
    for i, row in enumerate(out.tolist()):
        real = [j for j in row if j >= 0]
        assert row == real + [-1] * (len(row) - len(real)), "-1 only at the end of a row"
        assert len(set(real)) == len(real), "duplicates"
        assert anchor_index[i] not in real, "the anchor itself"
        if mode == "sequence":
            assert all(group[j] == anchor_group[i] for j in real)
    if mode in ("similar", "dissimilar") and dtype == torch.float32:
        keep = trimmed_sets(anchors, pool, anchor_index, 0.05)
        for i, row in enumerate(out.tolist()):
            assert {j for j in row if j >= 0} <= keep[i], "a trimmed candidate was returned"
    if mode != "sequence":
        assert (out >= 0).all()  # 130 candidates, k = 7: every slot is filled


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(1, 1, 3, 4), (7, 13, 5, 13), (29, 131, 19, 7), (64, 1000, 48, 32)])
def test_cpp_matches_reference_exactly(mode, shape):
    na, np_, d, k = shape
    ref = draw(mode, "reference", na=na, np_=np_, d=d, k=k)[0]
    cpp = draw(mode, "cpp", na=na, np_=np_, d=d, k=k)[0]
    torch.testing.assert_close(cpp, ref, rtol=0, atol=0)


def plackett_luce_pairs(w: np.ndarray) -> dict[tuple[int, int], float]:
    total = w.sum()
    return {(a, b): w[a] / total * w[b] / (total - w[a]) for a, b in itertools.permutations(range(len(w)), 2) if w[a] > 0 and w[b] > 0}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["similar", "dissimilar", "uniform"])
def test_distribution_of_the_first_two_picks(backend, mode):
    """Chi-square of the ordered first two picks against the exact without-replacement probabilities (alpha = 0.001)."""
    g = torch.Generator().manual_seed(7)
    pool = torch.randn(8, 5, generator=g)
    anchor = torch.randn(1, 5, generator=g)
    rows = 30_000
    out = sample_negatives(
        anchor.expand(rows, -1).contiguous(), pool, 3, mode=mode, trim=0.025, generator=torch.Generator().manual_seed(11), backend=backend
    )
    d = torch.cdist(anchor.double(), pool.double())[0].numpy()
    d_hat = (d - d.min()) / (d.max() - d.min())
    w = {"similar": 1 - d_hat, "dissimilar": d_hat, "uniform": np.ones(8)}[mode]
    probs = plackett_luce_pairs(w)
    counts = dict.fromkeys(probs, 0)
    for a, b in out[:, :2].tolist():
        assert (a, b) in counts, f"pair ({a}, {b}) has probability 0"
        counts[(a, b)] += 1
    observed = np.array([counts[c] for c in probs], dtype=float)
    expected = np.array([probs[c] * rows for c in probs])
    assert chi2_pvalue(observed, expected) > 1e-3
    if mode == "similar":  # the farthest candidate has weight 0 and is never drawn; the rows end with -1 instead
        assert int(np.argmax(d)) not in out.tolist()[0]


def test_same_seed_same_indices_and_generator_state_advances():
    a, p = torch.randn(10, 8), torch.randn(50, 8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = sample_negatives(a, p, 6, generator=g1)
    assert torch.equal(first, sample_negatives(a, p, 6, generator=g2))
    assert not torch.equal(first, sample_negatives(a, p, 6, generator=g1))  # the next draw differs


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_candidates_than_k(backend):
    pool = torch.randn(5, 4)
    out = sample_negatives(pool[:2], pool, 8, mode="uniform", anchor_index=torch.tensor([0, 1]), backend=backend)
    for i, row in enumerate(out.tolist()):
        assert sorted(row[:4]) == [j for j in range(5) if j != i] and row[4:] == [-1] * 4
    group = torch.tensor([0, 0, 1, 1, 1])
    out = sample_negatives(pool[:1], pool, 3, mode="sequence", anchor_index=torch.tensor([0]), group=group, backend=backend)
    assert out.tolist() == [[1, -1, -1]]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(pool=torch.randn(5, 3)), "same D"),
        (dict(pool=torch.randn(5, 4, dtype=torch.float64)), "one dtype"),
        (dict(anchors=torch.randn(3, 4, dtype=torch.float64), pool=torch.randn(5, 4, dtype=torch.float64)), "float32/bfloat16/float16"),
        (dict(k=0), "k must be a positive int"),
        (dict(pool=torch.randn(0, 4)), "the pool is empty"),
        (dict(mode="nearest"), "mode='nearest' is invalid"),
        (dict(trim=0.5), "trim=0.5 is invalid"),
        (dict(anchor_index=torch.tensor([0, 1, 9])), r"anchor_index values must be in \[-1, 5\)"),
        (dict(anchor_index=torch.tensor([0, 1])), "anchor_index must be an int64 tensor of shape"),
        (dict(mode="sequence"), "needs group"),
        (dict(anchors=torch.full((3, 4), float("nan"))), "NaN"),
        (dict(anchors=torch.randn(3)), r"\[Na, D\]"),
    ],
)
def test_bad_input_errors(kwargs, error):
    args = dict(anchors=torch.randn(3, 4), pool=torch.randn(5, 4), k=2) | kwargs
    with pytest.raises(ValueError, match=error):
        sample_negatives(args.pop("anchors"), args.pop("pool"), args.pop("k"), **args)


def test_backend_selection_is_explicit(monkeypatch):
    assert select_sampling("cpu") == "cpp"
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here: tensors are on the CPU"):
        sample_negatives(torch.randn(2, 3), torch.randn(4, 3), 1, backend="cuda")
    monkeypatch.setattr(backends, "C", None)
    monkeypatch.setattr(backends, "C_ERROR", "avmt._C is not built (test)")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot run here: avmt._C is not built \(test\)"):
        sample_negatives(torch.randn(2, 3), torch.randn(4, 3), 1, backend="cpp")
    with pytest.warns(UserWarning, match="slow PyTorch reference"):
        out = sample_negatives(torch.randn(2, 3), torch.randn(4, 3), 1)
    assert out.shape == (2, 1)


def test_opcheck_and_compile():
    op = torch.ops.avmt.sample_negatives.default
    args = (
        torch.randn(6, 5),
        torch.randn(20, 5),
        4,
        0,
        0.05,
        torch.arange(6),
        torch.zeros(6, dtype=torch.long),
        torch.zeros(20, dtype=torch.long),
        123,
    )
    torch.library.opcheck(op, args)
    compiled = torch.compile(lambda *a: op(*a) + 0, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), op(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_matches_reference(mode):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(3000, 64, generator=g).cuda()
    anchor_index = torch.randint(0, 3000, (400,), generator=g).cuda()
    group = torch.randint(0, 40, (3000,), generator=g).cuda()
    kw = dict(mode=mode, anchor_index=anchor_index, group=group)
    ref = sample_negatives(pool[anchor_index], pool, 32, generator=torch.Generator().manual_seed(1), backend="reference", **kw)
    cuda = sample_negatives(pool[anchor_index], pool, 32, generator=torch.Generator().manual_seed(1), backend="cuda", **kw)
    # cuBLAS and the reference's GEMM round differently: allow a few rows to differ at near-ties
    assert (cuda == ref).all(1).float().mean() > 0.99
