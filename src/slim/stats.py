"""Input statistics of a linear layer, accumulated over calibration tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    """Running sums over all calibration tokens: sum of squares per channel and optionally X^T X."""

    sum_sq: torch.Tensor
    gram: torch.Tensor | None
    n_tokens: int = 0

    @classmethod
    def empty(cls, d_in: int, with_gram: bool, device: torch.device | str = "cpu") -> InputStats:
        gram = torch.zeros(d_in, d_in, dtype=torch.float64, device=device) if with_gram else None
        return cls(torch.zeros(d_in, dtype=torch.float64, device=device), gram, 0)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs (..., d_in)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum_sq.device)
        xf = x.float()
        self.sum_sq += (xf * xf).sum(0).double()
        if self.gram is not None:
            self.gram += (xf.T @ xf).double()
        self.n_tokens += x.shape[0]

    @property
    def rms(self) -> torch.Tensor:
        return (self.sum_sq / max(self.n_tokens, 1)).sqrt()

    @property
    def mean_gram(self) -> torch.Tensor | None:
        return None if self.gram is None else self.gram / max(self.n_tokens, 1)

    def scaled(self, s: torch.Tensor) -> InputStats:
        """Statistics of x / s (used when weight columns are scaled by s)."""
        s = s.double().to(self.sum_sq.device)
        gram = None if self.gram is None else self.gram / s[:, None] / s[None, :]
        return InputStats(self.sum_sq / s**2, gram, self.n_tokens)
