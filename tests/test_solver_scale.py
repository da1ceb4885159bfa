"""The solver's large-model paths: the error-feedback pass's own factor reused by the fullcov adapter, the
one-Cholesky inverse factor, the randomized SVD, and OPTQ's column loop as a Triton kernel (in the interpreter on
a CPU, on CUDA under the `gpu` marker)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from slim.algorithms import lowrank
from slim.algorithms.lowrank import GramFactor, InverseFactor, fullcov_adapter, gram_factor, randomized_svd
from slim.algorithms.optq import damped_inverse_cholesky, optq, upper_inverse_factor
from slim.algorithms.stats import InputStats
from slim.config import CompressConfig, ConfigError
from slim.pipeline import solver

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _gram(d: int, n: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n or 4 * d, d, generator=g) * torch.linspace(0.2, 3.0, d)
    return (x.T @ x / x.shape[0]).double()


def _stats(d: int, seed: int = 0) -> InputStats:
    g = torch.Generator().manual_seed(seed)
    s = InputStats.empty(d, True)
    s.add(torch.randn(6 * d, d, generator=g) * torch.linspace(0.2, 3.0, d))
    return s


def test_upper_inverse_factor_is_the_upper_cholesky_of_the_inverse():
    h = _gram(300)
    u, info = upper_inverse_factor(h, chunk=64)
    assert info == 0
    assert torch.equal(u, u.triu())
    ref = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    assert torch.allclose(u, ref, rtol=1e-8, atol=1e-10)
    bad, info = upper_inverse_factor(-h)
    assert info != 0


def test_feedback_factor_inverts_the_damped_hessian_with_dead_inputs():
    h = _gram(120)
    h[7, :] = 0
    h[:, 7] = 0
    u, reached = damped_inverse_cholesky(h, 0.05)
    d = torch.diagonal(h).clone()
    d[7] = 1.0
    ref = h.clone()
    ref.diagonal().copy_(d + 0.05 * float(d.mean()))
    assert reached == 0.05
    assert torch.allclose(u.T @ u, torch.linalg.inv(ref), rtol=1e-7, atol=1e-9)


def test_feedback_factor_is_float64_and_float32_on_request():
    """float64 by default (float32 error feedback cost SmolLM2 5 % perplexity); float32 agrees to its precision."""
    h = _gram(200)
    u64, reached = damped_inverse_cholesky(h, 0.01)
    u32, _ = damped_inverse_cholesky(h, 0.01, dtype=torch.float32)
    assert u64.dtype == torch.float64 and u32.dtype == torch.float32 and reached == 0.01
    assert float((u32.double() - u64).abs().max() / u64.abs().max()) < 1e-5


@pytest.mark.parametrize("native", [True, False])
def test_optq_scaled_errors_satisfy_w_minus_q_equals_errors_times_u(native, monkeypatch):
    """What the adapter reuses: the pass leaves target - Q = E_s U exactly (to float32 rounding)."""
    from slim.algorithms import optq as optq_mod
    from slim.algorithms.optq import ColumnGrid
    from slim.algorithms.quant import fake_quant

    if not native:
        monkeypatch.setattr(optq_mod, "_native_loop", lambda: None)
    d_out, d_in = 48, 320
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d_out, d_in, generator=g)
    h = _gram(d_in)
    u, _ = damped_inverse_cholesky(h, 0.01)
    mask = torch.rand(d_out, d_in, generator=g) > 0.5
    scale = torch.tensor(0.25)
    grid = ColumnGrid(4, lambda cols: (scale.reshape(1, 1).expand(d_out, len(cols)), None))
    q, used, es = optq(w, None, lambda c, j: fake_quant(c, scale, 4), mask, hinv_chol=u, grid=grid, errors=True)
    assert torch.equal(used, mask) and bool((q[~mask] == 0).all())
    back = es.double() @ u.double()
    assert float((w.double() - q.double() - back).abs().max()) < 1e-4 * float(w.abs().max())


def test_inverse_factor_gives_the_gram_factor_adapter():
    """S = U^-1 and S = L weight the error the same way (S S^T = H + shift I): the same adapter, the same energy."""
    d_out, d_in, rank = 40, 96, 8
    g = torch.Generator().manual_seed(2)
    e = torch.randn(d_out, d_in, generator=g).double()
    h = _gram(d_in)
    u, reached = damped_inverse_cholesky(h, 0.01)
    inv = InverseFactor(u, reached * float(torch.diagonal(h).mean()), reached)
    low = gram_factor(h, 0.01)
    assert inv.shift == pytest.approx(low.shift)
    a1, b1 = fullcov_adapter(e, h, rank, factor=low)
    a2, b2 = fullcov_adapter(e, h, rank, factor=inv)
    assert torch.allclose(b1 @ a1, b2 @ a2, atol=1e-4)
    exact = float(((e @ h) * e).sum())
    assert inv.energy(e, inv.weight(e)) == pytest.approx(exact, rel=1e-9)
    assert low.energy(e, low.weight(e)) == pytest.approx(exact, rel=1e-9)
    assert torch.allclose(inv.unweight(inv.weight(e)), e, atol=1e-9)


def test_compress_weight_reuses_the_feedback_factor_with_the_same_result(monkeypatch):
    """The shared-factor path (adapter fitted in the error-feedback pass's coordinates, `SHARE_FEEDBACK_FACTOR`)
    against the general path (its own Cholesky factor, E L products), forced by a damping that differs in the
    7th digit."""
    monkeypatch.setattr(solver, "SHARE_FEEDBACK_FACTOR", True)
    d_out, d_in = 64, 256
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(3))
    fast = CompressConfig.from_dict({"adapter": {"rank": 16, "svd": "exact"}})
    slow = CompressConfig.from_dict({"adapter": {"rank": 16, "svd": "exact", "damping": 0.0100001}})
    st = _stats(d_in)
    prep = solver.prepare_weight(w, st, fast)
    assert isinstance(prep.factor, InverseFactor)
    assert isinstance(solver.prepare_weight(w, _stats(d_in), slow).factor, GramFactor)
    monkeypatch.setattr(solver, "SHARE_FEEDBACK_FACTOR", False)
    assert isinstance(solver.prepare_weight(w, _stats(d_in), fast).factor, GramFactor)  # the default
    monkeypatch.setattr(solver, "SHARE_FEEDBACK_FACTOR", True)
    cw_fast = solver.compress_weight(w, _stats(d_in), fast)
    cw_slow = solver.compress_weight(w, _stats(d_in), slow)
    f, s = cw_fast.info, cw_slow.info
    assert f["rel_err_compressed"] == pytest.approx(s["rel_err_compressed"], rel=1e-4)
    assert f["rel_err_final"] == pytest.approx(s["rel_err_final"], rel=2e-2)
    assert f["rel_err_final"] < 0.9 * f["rel_err_compressed"]  # the adapter wins error back
    # the reported error is the true calibration-weighted one, measured independently
    gram = _stats(d_in).mean_gram
    e = w.double() - (cw_fast.weight() + cw_fast.lora_B @ cw_fast.lora_A).double()
    true = float(((e @ gram) * e).sum() / ((w.double() @ gram) * w.double()).sum())
    assert f["rel_err_final"] == pytest.approx(true, rel=1e-3)


def test_randomized_svd_keeps_the_top_subspace():
    g = torch.Generator().manual_seed(4)
    m = torch.randn(300, 20, generator=g) @ torch.randn(20, 500, generator=g) * 3 + torch.randn(300, 500, generator=g)
    u, s, vh = randomized_svd(m, 20)
    ue, se, vhe = lowrank._truncated(m, 20, "exact")
    assert u.dtype == torch.float64 and u.shape == (300, 20) and vh.shape == (20, 500)
    assert float((s**2).sum() / (se**2).sum()) > 0.999
    assert torch.allclose(u.T @ u, torch.eye(20, dtype=torch.float64), atol=1e-5)
    # from the exact answer's subspace it stays there
    u2, s2, _ = randomized_svd(m, 20, start=ue)
    assert torch.allclose(s2, se, rtol=1e-4)


def test_auto_svd_is_randomized_only_from_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(lowrank, "randomized_svd", lambda m, r, start=None: calls.append(m.shape) or (None,) * 3)
    m = torch.randn(64, 200)
    lowrank._truncated(m, 4, "auto")
    assert calls == []
    monkeypatch.setattr(lowrank, "RANDOMIZED_FROM", 64)
    lowrank._truncated(m, 4, "auto")
    assert calls == [(64, 200)]
    lowrank._truncated(m, 4, "exact")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="svd must be one of"):
        lowrank._truncated(m, 4, "fast")


def test_adapter_svd_is_checked_by_the_configuration():
    assert CompressConfig.from_dict({"adapter": {"svd": "randomized"}}).adapter.svd == "randomized"
    with pytest.raises(ConfigError, match="adapter.svd must be one of"):
        CompressConfig.from_dict({"adapter": {"svd": "lanczos"}})


def _block_case(r: int = 40, b: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u, _ = damped_inverse_cholesky(_gram(b, seed=seed), 0.01)
    w = torch.randn(r, b, generator=g).double()
    keep = (torch.rand(r, b, generator=g) > 0.5).double()
    scale = torch.full((r, b), 0.3)
    zero = torch.randint(0, 3, (r, b), generator=g).float()
    return w, u, keep, scale, zero


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its interpreter runs the kernel on a CPU)")
@pytest.mark.parametrize("case", ["sym", "zero-point", "mask-only", "plain"])
def test_triton_block_loop_matches_the_cpu_kernel(case):
    """The GPU's column loop, run in Triton's interpreter, gives the C++ kernel's codes (half-to-even rounding,
    clamping, zero points, the mask) and its float64 errors."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    from slim.kernels.native import load
    from slim.kernels.optq_triton import optq_block_triton

    native = load()
    if native is None:
        pytest.skip("slim's C++ kernel is not built here")
    w, u, keep, scale, zero = _block_case(b=100 if case == "plain" else 128)
    k, s, z, bits = {"sym": (keep, scale[:, :128], None, 4), "zero-point": (keep, scale, zero, 4),
                     "mask-only": (keep, None, None, 0), "plain": (None, None, None, 0)}[case]
    none = torch.empty(0)  # the C++ kernel updates its weights in place: it gets a copy
    q_ref, e_ref = native.optq_block(w.clone(), u[: w.shape[1], : w.shape[1]].contiguous(),
                                     none if k is None else k, none if s is None else s,
                                     none if z is None else z, bits)
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    q, e = optq_block_triton(*(None if t is None else t.to(dev) for t in (w, u[: w.shape[1], : w.shape[1]], k, s, z)),
                             bits)
    assert q.dtype == torch.float64 and q.shape == w.shape
    tol = 1e-9 * float(w.abs().max())
    assert float((q.cpu() - q_ref).abs().max()) <= tol
    assert float((e.cpu() - e_ref).abs().max()) <= 1e-9 * float(e_ref.abs().max())
    assert torch.equal(w, _block_case(b=w.shape[1])[0])  # its input left as it was


def test_triton_block_loop_refuses_wide_blocks():
    if not HAS_TRITON:
        pytest.skip("needs Triton")
    from slim.kernels.optq_triton import optq_block_triton

    with pytest.raises(ValueError, match="at most 128 columns"):
        optq_block_triton(torch.zeros(4, 129), torch.eye(129), None, None, None, 0)


@pytest.mark.gpu
def test_optq_on_cuda_runs_the_triton_loop_and_matches_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from slim.algorithms import optq as optq_mod
    from slim.algorithms.optq import ColumnGrid
    from slim.algorithms.quant import fake_quant

    d_out, d_in = 256, 1024
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(5))
    u, _ = damped_inverse_cholesky(_gram(d_in), 0.01)
    mask = torch.rand(d_out, d_in) > 0.5
    scale = torch.tensor(0.2)
    grid = ColumnGrid(4, lambda cols: (scale.to(cols.device).reshape(1, 1).expand(d_out, len(cols)), None))
    assert optq_mod._block_loop(torch.device("cuda")) is not None
    q_cpu, _ = optq(w, None, lambda c, j: fake_quant(c, scale, 4), mask, hinv_chol=u, grid=grid)
    q_gpu, _ = optq(w.cuda(), None, lambda c, j: fake_quant(c, scale.cuda(), 4), mask.cuda(), hinv_chol=u.cuda(),
                    grid=grid)
    assert float((q_gpu.cpu() - q_cpu).abs().max()) < 1e-6  # both float64
