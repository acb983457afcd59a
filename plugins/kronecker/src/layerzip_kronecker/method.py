"""The `kronecker` method: Ŵ = α Σₖ Aₖ ⊗ Bₖ + S."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from layerzip import Approximator, Estimate, FitContext, Params, WeightView

from .factorize import (
    balanced_divisors,
    divisors,
    kron_params,
    kron_sum,
    nearest_kronecker,
    rearrange,
    tail_error,
)
from .module import OP, KroneckerLinear

Factors = tuple[tuple[int, int], tuple[int, int]]


class KroneckerParams(Params):
    factors: Factors | Literal["auto"] = Field(default="auto", description=(
        "[[m1, n1], [m2, n2]] with m1·m2 = out_features, n1·n2 = in_features; 'auto' searches "
        "divisor pairs near √m, √n for the lowest error at the parameter budget"))
    rank: int | None = Field(default=None, gt=0,
                             description="number of Kronecker terms (default 1)")
    ratio: float | None = Field(default=None, ge=0, lt=1, description=(
        "fraction of the layer's parameters to remove; the Kronecker terms and the residual "
        "(values + int32 indices) together stay within the rest"))
    alpha: Literal["lsq", "norm", "none"] = Field(default="lsq", description=(
        "scale of the Kronecker sum: 'lsq' = least squares (equals 1 after the exact SVD, kept "
        "for other fits), 'norm' = ‖W‖/‖Σ A⊗B‖ (can raise the error; for comparison), 'none'"))
    residual_fraction: float | None = Field(default=None, ge=0, lt=1, description=(
        "keep this fraction of the entries of W − α Σ A⊗B as a sparse residual"))
    residual_params: int | None = Field(default=None, ge=0, description=(
        "residual budget in parameter units, counting each kept entry's int32 index honestly"))
    residual_score: Literal["magnitude", "activation"] = Field(default="magnitude", description=(
        "'magnitude' = |Rᵢⱼ|; 'activation' = |Rᵢⱼ|·‖xⱼ‖ from calibration inputs"))
    residual_structure: Literal["entries", "blocks", "columns"] = Field(
        default="entries", description=(
            "'entries' keeps the largest single entries (slow on GPUs: gathers); 'blocks' keeps "
            "whole m2×n2 blocks of the factor grid — block (p, q) is E_pq ⊗ S_pq, so the kernel "
            "applies it with tensor-core dots; 'columns' keeps whole input columns (outlier "
            "input features), applied as a gather of those features and one tensor-core "
            "product. Blocks and columns are chosen by their summed squared score and each "
            "costs its values plus one int32 index"))

    @model_validator(mode="after")
    def _consistent(self):
        if self.rank is not None and self.ratio is not None:
            raise ValueError("give 'rank' or 'ratio', not both")
        if self.residual_fraction is not None and self.residual_params is not None:
            raise ValueError("give 'residual_fraction' or 'residual_params', not both")
        if self.factors != "auto":
            (m1, n1), (m2, n2) = self.factors
            if min(m1, n1, m2, n2) < 1:
                raise ValueError(f"factor sizes must be positive, got {self.factors}")
        return self


def _index_cost(dtype: torch.dtype) -> float:
    """Parameters one residual entry costs: its value plus a 4-byte index in value units."""
    return 1 + 4 / torch.empty(0, dtype=dtype).element_size()


class Kronecker(Approximator):
    name = "kronecker"
    description = "sum of Kronecker products (Van Loan–Pitsianis) plus an optional sparse residual"
    Params = KroneckerParams
    module_class = KroneckerLinear
    op = OP

    def needs_calibration(self, params) -> bool:
        return params.residual_score == "activation" and self._has_residual(params)

    @staticmethod
    def _has_residual(params) -> bool:
        return bool(params.residual_fraction) or bool(params.residual_params)

    # -- shapes and budgets ----------------------------------------------------------------
    def check(self, view: WeightView, params) -> None:
        m, n = view.shape
        if params.factors != "auto":
            (m1, n1), (m2, n2) = params.factors
            problems = []
            if m1 * m2 != m:
                problems.append(f"m1·m2 = {m1}·{m2} ≠ out_features {m} (divisors of {m}: "
                                f"{divisors(m)})")
            if n1 * n2 != n:
                problems.append(f"n1·n2 = {n1}·{n2} ≠ in_features {n} (divisors of {n}: "
                                f"{divisors(n)})")
            if problems:
                raise ValueError(f"factors {[list(f) for f in params.factors]}: "
                                 + "; ".join(problems))
            if params.rank and params.rank > min(m1 * n1, m2 * n2):
                raise ValueError(f"rank {params.rank} exceeds min(m1·n1, m2·n2) = "
                                 f"{min(m1 * n1, m2 * n2)}")
        elif len(divisors(m)) <= 2 and len(divisors(n)) <= 2:
            raise ValueError(f"{m}×{n}: both sizes are prime, no Kronecker factorization exists")

    def _budget(self, view: WeightView, params) -> float:
        m, n = view.shape
        return (1 - (params.ratio or 0.0)) * m * n

    @staticmethod
    def _residual_unit(view: WeightView, params, m2: int, n2: int) -> int:
        """Entries per residual index: 1 (entries), m2·n2 (blocks), out_features (columns)."""
        return {"blocks": m2 * n2, "columns": view.shape[0]}.get(params.residual_structure, 1)

    def _residual_nnz(self, view: WeightView, params, block: int = 1) -> int:
        """Kept residual entries; with blocks (or columns) of `block` entries, a multiple of
        it (each block costs `block` values + one index)."""
        m, n = view.shape
        if params.residual_structure != "entries":
            idx_cost = _index_cost(view.dtype) - 1
            if params.residual_fraction is not None:
                return math.floor(params.residual_fraction * m * n / block) * block
            if params.residual_params is not None:
                return math.floor(params.residual_params / (block + idx_cost)) * block
            return 0
        if params.residual_fraction is not None:
            return math.floor(params.residual_fraction * m * n)
        if params.residual_params is not None:
            return math.floor(params.residual_params / _index_cost(view.dtype))
        return 0

    def _residual_cost(self, view: WeightView, params, block: int) -> float:
        """Parameter units the residual takes: values plus int32 indices (one per entry, or
        one per block)."""
        nnz = self._residual_nnz(view, params, block)
        if params.residual_structure != "entries":
            return nnz + (nnz // block) * (_index_cost(view.dtype) - 1)
        return nnz * _index_cost(view.dtype)

    def _rank_for(self, view, params, m1, n1, m2, n2) -> int:
        cap = min(m1 * n1, m2 * n2)
        if params.ratio is None:
            return min(params.rank or 1, cap)
        budget = self._budget(view, params)
        if params.residual_fraction is not None or params.residual_params is not None:
            budget -= self._residual_cost(view, params,
                                          self._residual_unit(view, params, m2, n2))
        return max(1, min(cap, math.floor(budget / (m1 * n1 + m2 * n2))))

    def _candidates(self, view: WeightView, params) -> list[tuple[int, int, int, int]]:
        m, n = view.shape
        if params.factors != "auto":
            (m1, n1), (m2, n2) = params.factors
            return [(m1, n1, m2, n2)]
        return [(m1, n1, m // m1, n // n1) for m1 in balanced_divisors(m)
                for n1 in balanced_divisors(n)]

    @staticmethod
    def _most_balanced(cands):
        return min(cands, key=lambda c: abs(math.log(c[0] * c[1]) - math.log(c[2] * c[3])))

    def _choose(self, view, params, w=None):
        """(m1, n1, m2, n2, rank) — for 'auto', the lowest error at the budget, from singular
        values only; without the weight at hand (plan time) the most balanced candidate."""
        cands = self._candidates(view, params)
        ref = self._most_balanced(cands)
        if len(cands) == 1 or w is None:
            return (*ref, self._rank_for(view, params, *ref))
        # with a fixed rank, compare every shape at the parameter budget it implies at `ref`
        fixed_budget = kron_params(*ref, self._rank_for(view, params, *ref))
        best = None
        for c in cands:
            if params.ratio is None:
                r = max(1, min(c[0] * c[1], c[2] * c[3],
                               fixed_budget // (c[0] * c[1] + c[2] * c[3])))
            else:
                r = self._rank_for(view, params, *c)
            err = tail_error(torch.linalg.svdvals(rearrange(w, *c)), r)
            if best is None or err < best[0]:
                best = (err, (*c, r))
        return best[1]

    def estimate(self, view: WeightView, params) -> Estimate:
        m1, n1, m2, n2, r = self._choose(view, params)
        m, n = view.shape
        unit = self._residual_unit(view, params, m2, n2)
        nnz = self._residual_nnz(view, params, unit)
        # vec trick per term: X Bᵀ costs 2·n1·n2·m2, A (X Bᵀ) costs 2·m1·n1·m2
        flops = r * 2 * (n1 * n2 * m2 + m1 * n1 * m2) + 2 * nnz
        return Estimate(kron_params(m1, n1, m2, n2, r)
                        + math.ceil(self._residual_cost(view, params, unit))
                        + (m if view.bias is not None else 0), flops)

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, view: WeightView, params, context: FitContext) -> KroneckerLinear:
        w = view.dense(torch.float64)
        m1, n1, m2, n2, r = self._choose(view, params, w)
        a, b, s = nearest_kronecker(w, m1, n1, m2, n2, r)
        approx = kron_sum(a, b)
        if params.alpha == "lsq":
            alpha = float((w * approx).sum() / approx.square().sum().clamp_min(1e-300))
        elif params.alpha == "norm":
            alpha = float(torch.linalg.matrix_norm(w) / torch.linalg.matrix_norm(approx)
                          .clamp_min(1e-300))
        else:
            alpha = 1.0
        a = a * alpha
        resid = w - alpha * approx
        structure = params.residual_structure
        nnz = min(self._residual_nnz(view, params, self._residual_unit(view, params, m2, n2)),
                  w.numel())
        idx = torch.zeros(0, dtype=torch.int64)
        vals = torch.zeros(0, dtype=torch.float64)
        kept = torch.zeros(0, dtype=torch.int64)  # flat entry indices, for the error below
        if nnz:
            score = resid.abs()
            if params.residual_score == "activation":
                stats = context.stats
                if stats is None or stats.gram is None:
                    raise ValueError("residual_score 'activation' needs calibration inputs: "
                                     "pass calibration=... (or --calib FILE)")
                score = score * stats.gram.diagonal().clamp_min(0).sqrt().to(score)[None, :]
            if structure == "columns":  # whole input columns, by their summed squared score
                idx = torch.topk(score.square().sum(0), nnz // w.shape[0]).indices.sort().values
                vals = resid[:, idx]
                kept = (torch.arange(w.shape[0])[:, None] * w.shape[1] + idx[None, :]).reshape(-1)
            elif structure == "blocks":
                # block (p, q) = rows p·m2…, columns q·n2…: row p·n1 + q of R(·)
                energy = rearrange(score.square(), m1, n1, m2, n2).sum(1)
                idx = torch.topk(energy, nnz // (m2 * n2)).indices.sort().values
                vals = rearrange(resid, m1, n1, m2, n2)[idx].reshape(-1, m2, n2)
                grid = torch.arange(w.numel()).reshape(w.shape)
                kept = rearrange(grid, m1, n1, m2, n2)[idx].reshape(-1)
            else:
                idx = kept = torch.topk(score.reshape(-1), nnz).indices.sort().values
                vals = resid.reshape(-1)[idx]
        module = KroneckerLinear(view.out_features, view.in_features, [[m1, n1], [m2, n2]], r,
                                 nnz=int(idx.numel()), bias=view.bias is not None,
                                 backend=context.backend,
                                 residual_structure=params.residual_structure)
        with torch.no_grad():
            module.a.copy_(a)
            module.b.copy_(b)
            module.res_idx.copy_(idx.to(torch.int32))
            module.res_val.copy_(vals)
            if module.bias is not None:
                module.bias.copy_(view.bias)
        wn = float(torch.linalg.matrix_norm(w).clamp_min(1e-300))
        kron_err = float(torch.linalg.matrix_norm(resid))
        final = resid.reshape(-1).clone()
        final[kept] = 0
        module.fit_details = {
            "factors": [[m1, n1], [m2, n2]], "rank": r, "alpha": alpha,
            "residual_nnz": int(kept.numel()), "residual_structure": params.residual_structure,
            "predicted_relative_error": tail_error(s, r) / wn,
            "kronecker_relative_error": kron_err / wn,
            "relative_error": float(final.norm()) / wn,
        }
        return module
