"""Closed-form low-rank adapters for a weight error E (d_out x d_in), as pure torch functions.

The correction is dW = B @ A with A: r x d_in and B: d_out x r (the PEFT lora_A / lora_B layout),
so a layer computes y = x W_c^T + (x A^T) B^T.  Each method minimizes ||(E - B A) S||_F for an
input-side weighting S:
  naive    S = I                       (plain SVD of the error)
  slim     S = diag(rms of each input)  (the paper's saliency: invertible and additive)
  fullcov  S S^T = H, H = E[x^T x]     (exactly the calibration output error, with damping; S = Cholesky)
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from ..names import SVD_CHOICES

log = logging.getLogger(__name__)


RANDOMIZED_FROM = 1024  # svd="auto": randomized where the smaller side of the matrix is at least this wide
_POWER_COLD, _POWER_WARM = 4, 2  # subspace iterations from a random start, and from a previous fit's subspace


def _truncated(
    m: torch.Tensor, rank: int, svd: str = "exact", start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets (float64).

    svd="exact": via the eigendecomposition of the smaller Gram side, exact for the leading triplets in double
    precision and ~2x faster than a full SVD. The eigensolver stays in float64: a float32 one saves ~2 % of the
    default recipe's time but moved SmolLM2's WikiText-2 perplexity from 71.78 to 72.69 (docs/results/ablation).
    At 7B widths it is the solver's main cost (~10 s a fit on 2 CPU cores), so svd="randomized" runs subspace
    iteration instead (`randomized_svd`), warm-started from `start` (d_out x k, e.g. the previous fit's B in the
    refit loop); svd="auto" picks it where the smaller side is >= RANDOMIZED_FROM.
    """
    if svd not in SVD_CHOICES:
        raise ValueError(f"svd must be one of {SVD_CHOICES}, got {svd!r}")
    if svd == "auto":
        svd = "randomized" if min(m.shape) >= RANDOMIZED_FROM else "exact"
    if svd == "randomized" and _oversampled(rank, min(m.shape)) < min(m.shape):
        return randomized_svd(m, rank, start=start)
    m = m.double()
    if rank * 4 > min(m.shape):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    tall = m.shape[0] >= m.shape[1]
    g = m.T @ m if tall else m @ m.T
    ev, vec = torch.linalg.eigh(g)
    idx = ev.argsort(descending=True)[:rank]
    s = ev[idx].clamp_min(0).sqrt()
    v = vec[:, idx]
    other = (m @ v if tall else m.T @ v) / s.clamp_min(torch.finfo(s.dtype).tiny)
    return (other, s, v.T) if tall else (v, s, other.T)


def _oversampled(rank: int, full: int) -> int:
    return min(full, rank + max(16, rank // 2))


def randomized_svd(
    m: torch.Tensor, rank: int, start: torch.Tensor | None = None, power: int | None = None, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets by subspace iteration (Halko, Martinsson & Tropp 2011), float64 out.

    The big products run in float32 on m's device (QR re-orthonormalizes after each one); the small k x n
    projection is decomposed in float64. Oversampling is k = r + max(16, r/2): a compression error's spectrum
    is flat (quantization noise), where the top-r energy converges slowly; with 4 power steps the subspace
    keeps all but ~1 % of the exact top-r energy of a flat 4096 x 4096 test matrix, at ~1/4 of the exact path's
    time. `start` (d_out x j, j < k) seeds the subspace (then 2 steps): in the refit loop the previous round's
    B spans nearly the same subspace.
    """
    mf = m.float()
    d_out, d_in = mf.shape
    k = _oversampled(rank, min(d_out, d_in))
    g = torch.Generator(device=mf.device).manual_seed(seed)
    fresh = k if start is None else k - min(start.shape[1], k - 1)
    y = mf @ torch.randn(d_in, fresh, generator=g, device=mf.device)
    if start is not None:
        y = torch.cat([start[:, : k - fresh].to(mf), y], 1)
    q = torch.linalg.qr(y).Q
    for _ in range(power if power is not None else _POWER_COLD if start is None else _POWER_WARM):
        q = torch.linalg.qr(mf @ torch.linalg.qr(mf.T @ q).Q).Q
    b = (q.T @ mf).double()  # k x d_in: its top-r triplets through the k x k Gram (exact for them in float64)
    ev, vec = torch.linalg.eigh(b @ b.T)
    ev, vec = ev.flip(0)[:rank], vec.flip(1)[:, :rank]
    s = ev.clamp_min(0).sqrt()
    vh = (vec.T @ b) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return q.double() @ vec, s, vh


def naive_adapter(
    err: torch.Tensor, rank: int, svd: str = "exact", start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation of E in Frobenius norm (Naive-LoRA)."""
    u, s, vh = _truncated(err, rank, svd, start)
    return (s[:, None] * vh).float(), u.float()


def slim_adapter(
    err: torch.Tensor, rms: torch.Tensor, rank: int, eps: float = 1e-8, svd: str = "exact",
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLiM-LoRA: SVD of E diag(d), d = RMS of each input channel, then undo the scaling on A."""
    d = rms.double().clamp_min(eps * float(rms.max().clamp_min(eps)))
    u, s, vh = _truncated(err.double() * d[None, :], rank, svd, start)
    a = (s[:, None] * vh) / d[None, :]
    return a.float(), u.float()


def squares(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares accumulated in float64, without a float64 copy of t (a 7B MLP's error is 180 MB in float32)."""
    return torch.linalg.vector_norm(t.reshape(-1), dtype=torch.float64) ** 2


class GramFactor(NamedTuple):
    """L lower-triangular with L L^T = H + shift * I: the damped Gram matrix's Cholesky factor."""

    low: torch.Tensor
    shift: float
    damping: float | None = None  # the relative damping reached (above the requested one if it had to be raised)

    def energy(self, err: torch.Tensor, product: torch.Tensor) -> float:
        """tr(E H E^T) from `product` = E L (computed anyway for the adapter fit): ||E L||^2 - shift ||E||^2,
        without another d_out x d_in x d_in product."""
        return float(squares(product) - self.shift * squares(err))

    def weight(self, err: torch.Tensor) -> torch.Tensor:
        """E S with S = L."""
        return times_lower(err, self.low)

    def unweight(self, x: torch.Tensor) -> torch.Tensor:
        """X S^-1 (an adapter's A back from the weighted space)."""
        return torch.linalg.solve_triangular(self.low, x.to(self.low.dtype), upper=False, left=False)


class InverseFactor(NamedTuple):
    """S = U^-1 for the upper U with U^T U = (H + shift I)^-1: the error-feedback pass's own factor.

    S S^T = H + shift I, as for `GramFactor`, so the optimal adapter is the same; and the error-feedback pass
    leaves T - Q = E_s U (E_s: its scaled column errors), so (T - Q) S = E_s comes free: the adapter fit needs
    no d_out x d_in x d_in product. `dead` marks inputs that never fired (their H_jj was set to 1, as OPTQ does).
    """

    upper: torch.Tensor
    shift: float
    damping: float | None = None
    dead: torch.Tensor | None = None

    def energy(self, err: torch.Tensor, product: torch.Tensor) -> float:
        """tr(E H E^T) from `product` = E S."""
        out = squares(product) - self.shift * squares(err)
        if self.dead is not None:
            out = out - squares(err[:, self.dead])
        return float(out)

    def weight(self, err: torch.Tensor) -> torch.Tensor:
        """E S = E U^-1 (a triangular solve)."""
        return torch.linalg.solve_triangular(self.upper, err.to(self.upper.dtype), upper=True, left=False)

    def unweight(self, x: torch.Tensor) -> torch.Tensor:
        """X S^-1 = X U."""
        return x.to(self.upper.dtype) @ self.upper


def gram_factor(h: torch.Tensor, damping: float) -> GramFactor:
    """Cholesky factor of the relatively damped Gram matrix, H + damping * mean(diag H) * I = L L^T.

    Any S with S S^T = H weights the error the same way (||E S||_F^2 = tr(E H E^T)), so the optimal
    adapter is the same for L as for the symmetric root H^(1/2); a Cholesky factorization costs a small
    fraction of the eigendecomposition the root needs. More damping is added only if it still fails (logged, and
    kept in the factor's `damping`).
    """
    h = h.double()
    h = (h + h.T) / 2  # one copy, damped on its diagonal in place (no n x n identity: a 70B MLP's is 6.6 GB)
    mean_diag = float(torch.diagonal(h).mean().clamp_min(1e-12))
    diag = torch.diagonal(h)
    plain = diag.clone()
    for extra in (0.0, 0.1, 1.0, 10.0):
        shift = (damping + extra) * mean_diag
        diag.copy_(plain + shift)
        low, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            if extra:  # a raised damping weakens the adapter's weighting: say so
                log.warning("adapter: the %d x %d Gram matrix's Cholesky failed at damping %g; raised to %g",
                            h.shape[0], h.shape[1], damping, damping + extra)
            return GramFactor(low, shift, damping + extra)
        del low
    raise torch.linalg.LinAlgError("Gram matrix is not positive definite even after heavy damping")


def times_lower(e: torch.Tensor, low: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """e @ low (float64) for a lower-triangular `low`, by column chunks that skip its zero upper part
    (~(k + 1) / 2k of the multiply-adds for k chunks)."""
    e = e.double()
    d = low.shape[0]
    if d <= chunk:
        return e @ low
    out = torch.empty(e.shape[0], d, dtype=e.dtype, device=e.device)
    for j0 in range(0, d, chunk):
        j1 = min(j0 + chunk, d)
        out[:, j0:j1] = e[:, j0:] @ low[j0:, j0:j1]
    return out


def fullcov_adapter(
    err: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = 0.01,
    factor: GramFactor | InverseFactor | None = None, product: torch.Tensor | None = None, svd: str = "exact",
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r correction optimal for the calibration output error ||X (E - B A)^T||_F.

    `factor` (a `GramFactor`, or the error-feedback pass's `InverseFactor`) may be passed to reuse it across
    calls, and `product` = E S when the caller has it.
    """
    f = factor if factor is not None else gram_factor(gram, damping)
    u, s, vh = _truncated(product if product is not None else f.weight(err), rank, svd, start)
    a = f.unweight(s[:, None] * vh)  # (s vh) S^-1
    return a.float(), u.float()


def output_error(err: torch.Tensor, gram: torch.Tensor | None = None, rms: torch.Tensor | None = None) -> float:
    """Calibration-weighted squared error tr(E H E^T) (or its diagonal approximation from the RMS)."""
    e = err.double()
    if gram is not None:
        return float(((e @ gram.double()) * e).sum())
    if rms is not None:
        return float(((e * rms.double()[None, :]) ** 2).sum())
    return float((e**2).sum())
