import torch
from conftest import correlated_inputs

from slim.algorithms.lowrank import fullcov_adapter, naive_adapter, output_error, slim_adapter
from slim.algorithms.stats import InputStats


def _setup(d_out=48, d_in=64, n=2000, seed=0):
    x = correlated_inputs(n, d_in, seed)
    g = torch.Generator().manual_seed(seed + 1)
    err = torch.randn(d_out, d_in, generator=g)
    st = InputStats.empty(d_in, with_gram=True)
    st.add(x)
    return x, err, st


def out_err(x, err, a, b):
    return float((x @ (err - b @ a).T).pow(2).sum())


def test_slim_beats_naive_on_calibration_output_error():
    for seed in range(3):
        x, err, st = _setup(seed=seed)
        r = 6
        a_n, b_n = naive_adapter(err, r)
        a_s, b_s = slim_adapter(err, st.rms, r)
        assert out_err(x, err, a_s, b_s) < out_err(x, err, a_n, b_n)


def test_fullcov_never_above_diagonal():
    for seed in range(5):
        x, err, st = _setup(seed=seed)
        for r in (1, 4, 12):
            a_s, b_s = slim_adapter(err, st.rms, r)
            a_f, b_f = fullcov_adapter(err, st.mean_gram, r, damping=0.0)
            assert out_err(x, err, a_f, b_f) <= out_err(x, err, a_s, b_s) * (1 + 1e-6)


def test_fullcov_ill_conditioned_gram():
    d = 32
    x = torch.randn(10, d)  # rank 10 < d: singular Gram matrix
    st = InputStats.empty(d, with_gram=True)
    st.add(x)
    a, b = fullcov_adapter(torch.randn(16, d), st.mean_gram, 4, damping=0.01)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_output_error_matches_direct():
    x, err, st = _setup()
    direct = float((x.double() @ err.double().T).pow(2).sum()) / x.shape[0]
    assert abs(output_error(err, st.mean_gram) - direct) / direct < 1e-6


def test_truncated_matches_full_svd():
    from slim.algorithms.lowrank import _truncated

    for shape in ((300, 120), (120, 300)):
        m = torch.randn(*shape, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, shape[1], dtype=torch.float64))
        u, s, vh = _truncated(m, 10)
        uf, sf, vhf = torch.linalg.svd(m, full_matrices=False)
        assert torch.allclose(s, sf[:10], rtol=1e-10)
        assert torch.allclose((u * s) @ vh, (uf[:, :10] * sf[:10]) @ vhf[:10], atol=1e-10)
        assert torch.allclose(u.T @ u, torch.eye(10, dtype=torch.float64), atol=1e-8)


def test_fit_product_gives_the_output_error_without_another_product():
    """tr(E H E^T) = ||E L||^2 - shift ||E||^2 for the damped factor L L^T = H + shift I, and the chunked
    triangular product equals the full one."""
    from slim.algorithms.lowrank import gram_factor, times_lower

    x = correlated_inputs(3000, 300).double()
    h = x.T @ x / 3000
    e = torch.randn(50, 300, dtype=torch.float64)
    f = gram_factor(h, 0.01)
    p = times_lower(e, f.low)
    torch.testing.assert_close(p, e @ f.low, rtol=1e-12, atol=1e-12)
    ref = output_error(e, h)
    assert abs(f.energy(e, p) - ref) <= 1e-9 * ref
