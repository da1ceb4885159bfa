"""Closed-form low-rank adapters for a weight error E (d_out x d_in), as pure torch functions.

The correction is dW = B @ A with A: r x d_in and B: d_out x r (the PEFT lora_A / lora_B layout),
so a layer computes y = x W_c^T + (x A^T) B^T.  Each method minimizes ||(E - B A) S||_F for an
input-side weighting S:
  naive    S = I                       (plain SVD of the error)
  slim     S = diag(rms of each input)  (the paper's saliency: invertible and additive)
  fullcov  S = H^(1/2), H = E[x^T x]    (exactly the calibration output error, with damping)
"""

from __future__ import annotations

import torch


def _truncated(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets (float64). Via the eigendecomposition of the smaller Gram side, which
    is exact for the leading triplets in double precision and ~2x faster than a full SVD."""
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


def naive_adapter(err: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation of E in Frobenius norm (Naive-LoRA)."""
    u, s, vh = _truncated(err, rank)
    return (s[:, None] * vh).float(), u.float()


def slim_adapter(
    err: torch.Tensor, rms: torch.Tensor, rank: int, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLiM-LoRA: SVD of E diag(d), d = RMS of each input channel, then undo the scaling on A."""
    d = rms.double().clamp_min(eps * float(rms.max().clamp_min(eps)))
    u, s, vh = _truncated(err.double() * d[None, :], rank)
    a = (s[:, None] * vh) / d[None, :]
    return a.float(), u.float()


def sqrt_and_inv_sqrt(h: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H^(1/2) and H^(-1/2) of a PSD Gram matrix with relative damping and an eigenvalue floor."""
    h = h.double()
    h = (h + h.T) / 2
    mean_diag = float(torch.diagonal(h).mean().clamp_min(1e-12))
    h = h + damping * mean_diag * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    evals, evecs = torch.linalg.eigh(h)
    evals = evals.clamp_min(max(damping, 1e-6) * mean_diag * 1e-3)
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


def fullcov_adapter(
    err: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = 0.01,
    roots: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r correction optimal for the calibration output error ||X (E - B A)^T||_F.

    `roots` = sqrt_and_inv_sqrt(gram, damping) may be passed to reuse it across calls.
    """
    s_half, s_inv = roots if roots is not None else sqrt_and_inv_sqrt(gram, damping)
    u, s, vh = _truncated(err.double() @ s_half, rank)
    a = (s[:, None] * vh) @ s_inv
    return a.float(), u.float()


def output_error(err: torch.Tensor, gram: torch.Tensor | None = None, rms: torch.Tensor | None = None) -> float:
    """Calibration-weighted squared error tr(E H E^T) (or its diagonal approximation from the RMS)."""
    e = err.double()
    if gram is not None:
        return float(((e @ gram.double()) * e).sum())
    if rms is not None:
        return float(((e * rms.double()[None, :]) ** 2).sum())
    return float((e**2).sum())
