"""Rank selection rules. Each takes the layer shape and (where needed) singular values."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from layerzip import Params

RULES = ("rank", "energy", "fraction", "ratio", "auto")


class RankParams(Params):
    """Exactly one rank rule: ``rank`` (int), ``energy`` (keep that fraction of Σσ²),
    ``fraction`` (of min(m, n)), ``ratio`` (fraction of the layer's parameters removed:
    r = ⌊(1−ρ)·m·n/(m+n)⌋) or ``auto: true`` (r = ⌊√min(m, n)⌋)."""

    rank: int | None = Field(default=None, gt=0)
    energy: float | None = Field(default=None, gt=0, le=1)
    fraction: float | None = Field(default=None, gt=0, le=1)
    ratio: float | None = Field(default=None, ge=0, lt=1)
    auto: bool = False

    @model_validator(mode="after")
    def _exactly_one(self):
        chosen = [k for k in RULES if (getattr(self, k) if k == "auto" else
                                       getattr(self, k) is not None)]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of {', '.join(RULES)} to choose the rank "
                             f"(got {', '.join(chosen) if chosen else 'none'})")
        return self

    @property
    def needs_spectrum(self) -> bool:
        return self.energy is not None


def rank_from_shape(params: RankParams, m: int, n: int) -> int | None:
    """The rank when it depends only on the shape; None for spectrum-based rules."""
    k = min(m, n)
    if params.rank is not None:
        return params.rank
    if params.fraction is not None:
        return max(1, math.floor(params.fraction * k))
    if params.ratio is not None:
        return max(1, min(k, math.floor((1 - params.ratio) * m * n / (m + n))))
    if params.auto:
        return max(1, math.isqrt(k))
    return None


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} σᵢ² ≥ energy · Σ σᵢ²."""
    e = s.double().square()
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


def rank_for_error(s: torch.Tensor, tolerance: float, max_rank: int | None = None) -> int:
    """Smallest r with √(Σ_{i≥r} σᵢ²)/√(Σ σᵢ²) ≤ tolerance, capped by max_rank."""
    e = s.double().square()
    total = e.sum().clamp_min(1e-300)
    tail = (total - torch.cumsum(e, 0)).clamp_min(0)  # tail[r-1] = Σ_{i≥r} σᵢ²
    ok = torch.nonzero(torch.sqrt(tail / total) <= tolerance)
    r = int(ok[0].item()) + 1 if len(ok) else len(s)
    return min(r, max_rank) if max_rank else r


def relative_tail_error(s: torch.Tensor, r: int) -> float:
    e = s.double().square()
    return float(torch.sqrt(e[r:].sum() / e.sum().clamp_min(1e-300)))
