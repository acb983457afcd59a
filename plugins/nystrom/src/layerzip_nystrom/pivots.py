"""Pivot strategies: uniform, l2 (∝ squared norms) and leverage (full-rank leverage scores).

Sampling is seeded by the generator passed in and reproducible; ``replace=False`` (default)
draws k distinct indices by weighted sampling without replacement (torch.multinomial),
``replace=True`` with replacement (duplicates possible). For W = A ⊗ B the scores factor
(‖col_(i,j)‖ = ‖aᵢ‖·‖bⱼ‖, ℓ_(i,j) = ℓ_A(i)·ℓ_B(j)) and are computed from the factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from layerzip import PivotStrategy, WeightView


def _sample(weights: Tensor, k: int, generator: torch.Generator, replace: bool) -> Tensor:
    w = weights.double().clamp_min(0)
    if float(w.sum()) == 0.0:
        w = torch.ones_like(w)
    if not replace and k > int((w > 0).sum()):
        w = w + (w.sum() * 1e-12 + 1e-300)  # allow zero-score indices once the others are used
    return torch.multinomial(w.cpu(), k, replacement=replace, generator=generator).sort().values


def leverage_scores(m: Tensor, axis: str, precision: torch.dtype | None = None,
                    k: int | None = None) -> Tensor:
    """Leverage scores: squared row norms of an orthonormal basis of the column space (for rows)
    or of the row space (for columns) — of the top-k singular subspace when k is given, else of
    the whole numerical range, with the rank judged at the precision the weights were stored in
    (a float32 weight has float32 rounding noise in its spectrum)."""
    eps = torch.finfo(precision or m.dtype).eps
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    keep = s > s.max() * max(m.shape) * eps
    if k is not None:
        keep &= torch.arange(len(s)) < k
    basis = u[:, keep] if axis == "rows" else vh[keep].t()
    return basis.square().sum(1)


class UniformPivots(PivotStrategy):
    name = "uniform"
    description = "every index equally likely"

    def select(self, view, k, axis, *, generator, replace=False):
        size = view.out_features if axis == "rows" else view.in_features
        return _sample(torch.ones(size), k, generator, replace)


class L2Pivots(PivotStrategy):
    name = "l2"
    description = "probability ∝ squared row/column norm (structure-aware)"

    def scores(self, view: WeightView, axis: str) -> Tensor:
        return (view.row_norms() if axis == "rows" else view.col_norms()).square()

    def select(self, view, k, axis, *, generator, replace=False):
        return _sample(self.scores(view, axis), k, generator, replace)


class LeveragePivots(PivotStrategy):
    name = "leverage"
    description = ("probability ∝ leverage scores: rank-k on dense weights, full-rank and "
                   "factored (ℓ_A ⊗ ℓ_B) on Kronecker-structured ones")

    def scores(self, view: WeightView, axis: str, k: int | None = None) -> Tensor:
        kron = view.structure.get("kronecker")
        if kron is not None:  # full-rank leverage factors over A ⊗ B; never materialize W
            a, b = kron
            la, lb = leverage_scores(a, axis), leverage_scores(b, axis)
            return (la[:, None] * lb[None, :]).reshape(-1)
        return leverage_scores(view.dense(torch.float64), axis, precision=view.dtype, k=k)

    def select(self, view, k, axis, *, generator, replace=False):
        return _sample(self.scores(view, axis, k), k, generator, replace)
