"""The low-rank methods: svd, rsvd, adaptive — each optionally activation-aware (whiten)."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from layerzip import Approximator, Estimate, FitContext, Params, WeightView

from .backends import OP
from .module import LowRankLinear
from .rank import RankParams, rank_for_energy, rank_for_error, rank_from_shape


class _Whitening(Params):
    whiten: bool = Field(default=False, description=(
        "activation-aware, truncation-aware whitening (SVD-LLM): factor W·L with L = chol(XᵀX) "
        "from the calibration inputs, so the kept rank minimizes the output error on them"))
    damping: float = Field(default=0.0, ge=0, lt=1, description=(
        "with whiten: add damping·mean(diag XᵀX)·I before the Cholesky. 0 is exact SVD-LLM; a "
        "little (0.01) guards against overfitting when calibration rows are few compared with "
        "the layer's input width"))


class SvdParams(RankParams, _Whitening):
    pass


class RsvdParams(RankParams, _Whitening):
    oversampling: int = Field(default=10, ge=0)
    power_iterations: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _no_energy(self):
        if self.energy is not None:
            raise ValueError("rsvd computes only the leading singular values, so it cannot "
                             "choose a rank by 'energy'; use method 'svd' or 'adaptive' for that")
        return self


class AdaptiveParams(_Whitening):
    error_tolerance: float = Field(gt=0, lt=1, description=(
        "largest relative Frobenius error ‖W−Ŵ‖/‖W‖ allowed (with whiten: the relative output "
        "error on the calibration inputs)"))
    max_rank: int | None = Field(default=None, gt=0)


def whitening_factor(gram: torch.Tensor, damping: float = 0.0) -> tuple[torch.Tensor, float]:
    """Lower-triangular L with L Lᵀ = S + λI. λ = damping·mean(diag S); when that is 0 and S is
    not positive definite, the smallest 1e-10·mean(diag S)·10^k that makes the Cholesky work."""
    s = gram.double()
    n = s.shape[0]
    eye = torch.eye(n, dtype=s.dtype, device=s.device)
    base = float(s.diagonal().mean().clamp_min(1e-300))
    lam = damping * base
    for k in range(16):
        L, info = torch.linalg.cholesky_ex(s + lam * eye)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return L, lam
        lam = max(lam, base * 10.0 ** (k - 10))
    raise ValueError("the calibration Gram matrix could not be made positive definite; check "
                     "the calibration inputs for NaN/inf")


class _LowRank(Approximator):
    Params = SvdParams
    module_class = LowRankLinear
    op = OP

    def needs_calibration(self, params) -> bool:
        return bool(params.whiten)

    def check(self, view: WeightView, params) -> None:
        r = getattr(params, "rank", None)
        k = min(view.shape)
        if r is not None and r > k:
            raise ValueError(f"rank {r} exceeds min(out, in) = {k}")
        if getattr(params, "max_rank", None) and params.max_rank > k:
            raise ValueError(f"max_rank {params.max_rank} exceeds min(out, in) = {k}")

    def planned_rank(self, view: WeightView, params) -> int:
        """The rank the estimate assumes (the upper bound for spectrum-based rules)."""
        m, n = view.shape
        if isinstance(params, RankParams):
            r = rank_from_shape(params, m, n)
            if r is not None:
                return r
        return getattr(params, "max_rank", None) or min(m, n)

    def estimate(self, view: WeightView, params) -> Estimate:
        m, n = view.shape
        r = self.planned_rank(view, params)
        return Estimate(r * (m + n) + (m if view.bias is not None else 0), 2 * r * (m + n))

    # -- fitting -----------------------------------------------------------------------------
    def _target(self, view: WeightView, params, context: FitContext):
        """The matrix to factor (W, or W·L when whitening) and L (or None)."""
        w = view.dense(torch.float64)
        if not params.whiten:
            return w, None, {}
        if context.stats is None or context.stats.gram is None:
            raise ValueError("whiten: true needs calibration inputs: pass calibration=... to "
                             "layerzip.compress, or --calib FILE to the CLI")
        L, lam = whitening_factor(context.stats.gram.to(w.device), params.damping)
        return w @ L, L, {"whiten_ridge": lam, "calibration_rows": context.stats.count}

    def _decompose(self, a: torch.Tensor, r_max: int, params, context):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u, s, vh.mT

    def _choose_rank(self, s: torch.Tensor, view: WeightView, params) -> int:
        m, n = view.shape
        if isinstance(params, AdaptiveParams):
            return rank_for_error(s, params.error_tolerance, params.max_rank)
        r = rank_from_shape(params, m, n)
        return r if r is not None else rank_for_energy(s, params.energy)

    def fit(self, view: WeightView, params, context: FitContext) -> LowRankLinear:
        a, L, details = self._target(view, params, context)
        r_planned = self.planned_rank(view, params)
        u, s, v = self._decompose(a, r_planned, params, context)
        r = max(1, min(self._choose_rank(s, view, params), s.shape[0]))
        root = s[:r].sqrt()
        U = u[:, :r] * root
        V = v[:, :r] * root
        if L is not None:  # Ŵ = U_r Σ_r V_rᵀ L⁻¹  ⇒  the input factor is L⁻ᵀ V_r √Σ_r
            V = torch.linalg.solve_triangular(L.mT, V, upper=True)
        module = LowRankLinear(view.out_features, view.in_features, r, view.bias is not None,
                               backend=context.backend)
        with torch.no_grad():
            module.u.copy_(U)
            module.v.copy_(V)
            if module.bias is not None:
                module.bias.copy_(view.bias)
        e = s.double().square()
        module.fit_details = {"rank": r, **details,
                              "predicted_relative_error": float(
                                  torch.sqrt(e[r:].sum() / e.sum().clamp_min(1e-300)))
                              if s.shape[0] == min(view.shape) else None}
        return module


class Svd(_LowRank):
    name = "svd"
    description = "truncated SVD W ≈ U_r Σ_r V_rᵀ (optionally whitened by calibration inputs)"
    Params = SvdParams


class Rsvd(_LowRank):
    name = "rsvd"
    description = "randomized SVD (Halko–Martinsson–Tropp) through torch.svd_lowrank"
    Params = RsvdParams

    def _decompose(self, a, r_max, params, context):
        q = min(r_max + params.oversampling, min(a.shape))
        # torch.svd_lowrank draws its test matrix from the global generator: fork and seed it
        # per layer so results are reproducible and the caller's RNG state is untouched.
        with torch.random.fork_rng(devices=[a.device] if a.is_cuda else []):
            torch.manual_seed(int(context.generator().initial_seed()) % (2**63))
            u, s, v = torch.svd_lowrank(a, q=q, niter=params.power_iterations)
        return u, s, v


class Adaptive(_LowRank):
    name = "adaptive"
    description = "smallest rank whose relative error ≤ error_tolerance (from singular values)"
    Params = AdaptiveParams

    def planned_rank(self, view, params):
        return params.max_rank or min(view.shape)

