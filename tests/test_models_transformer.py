import numpy as np
import pytest
import torch

from avmt.models import LowRankLinear, RotationCache


def expm_numpy(s: np.ndarray) -> np.ndarray:
    """exp(S) in float64 by scaling and squaring of a Taylor series, independent of torch.matrix_exp."""
    k = max(0, int(np.ceil(np.log2(max(np.linalg.norm(s, 1), 1e-300) / 0.25))))
    x = s / 2.0**k
    out, term = np.eye(s.shape[0]), np.eye(s.shape[0])
    for i in range(1, 25):
        term = term @ x / i
        out = out + term
    for _ in range(k):
        out = out @ out
    return out


def reference_float64(m: LowRankLinear, x: torch.Tensor, group: int) -> np.ndarray:
    u, b = m.U.detach().double().numpy(), m.bias.detach().double().numpy()
    v, a = m.V[group].detach().double().numpy(), m.A[group].detach().double().numpy()
    r = expm_numpy(a - a.T)
    z = x.double().numpy() @ v
    z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), m.eps)
    return z @ (u @ r).T + b  # y = U R_m normalize(V_m^T x) + b, row-vector form


@pytest.mark.parametrize("n, m_out, rank, groups", [(37, 53, 11, 3), (8, 129, 16, 2), (64, 64, 64, 1)])
def test_matches_float64_formula(n, m_out, rank, groups):
    torch.manual_seed(n)
    layer = LowRankLinear(n, m_out, rank, groups, init_std=0.02, eps=1e-6)
    with torch.no_grad():  # a far-from-identity rotation and a non-zero bias, not the init values
        layer.A.normal_(std=0.5)
        layer.bias.normal_()
    x = torch.randn(5, 7, n)
    for g in range(groups):
        want = reference_float64(layer, x, g)
        got = layer(x, g).detach().double().numpy()
        assert got.shape == (5, 7, m_out)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_gradients_match_finite_differences_in_float64():
    torch.manual_seed(0)
    layer = LowRankLinear(6, 5, 4, 2, init_std=0.3, eps=1e-6).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    for g in (0, 1):
        params = (layer.U, layer.bias, layer.V, layer.A)

        def fn(x, *ps, g=g):
            return torch.func.functional_call(layer, dict(zip(("U", "bias", "V", "A"), ps)), (x, g))

        assert torch.autograd.gradcheck(fn, (x, *params))


def test_rotations_stay_orthogonal_after_optimizer_steps():
    torch.manual_seed(0)
    layer = LowRankLinear(24, 40, 16, 3, init_std=0.02, eps=1e-6)
    before = layer.rotations().detach().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=5e-2, betas=(0.9, 0.98), weight_decay=1e-4, amsgrad=True)
    target = torch.randn(64, 40)
    x = torch.randn(64, 24)
    for _ in range(30):
        loss = sum(((layer(x, g) - target) ** 2).mean() for g in range(3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = layer.rotations().detach()
    assert (r - before).abs().max() > 0.1  # the rotations really moved
    eye = torch.eye(16).expand(3, 16, 16)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(3), atol=1e-4, rtol=0)  # proper rotations


def test_zero_input_gives_bias_and_cache_is_shared():
    layer = LowRankLinear(10, 12, 4, 2, init_std=0.02, eps=1e-6)
    with torch.no_grad():
        layer.bias.normal_()
    y = layer(torch.zeros(3, 10), 1)
    torch.testing.assert_close(y, layer.bias.detach().expand(3, 12))
    cache = RotationCache()
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x, 0, cache), layer(x, 0))
    assert len(cache) == 1 and cache.rotations(layer) is cache.rotations(layer)
    with pytest.raises(IndexError, match="group 2 out of range"):
        layer(x, 2)
