"""The `ks_chain` method: W ≈ K_L ⋯ K_1, each K_ℓ Kronecker-sparse."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from layerzip import Approximator, Estimate, FitContext, Params, WeightView

from .chain import random_factors
from .fit import closed_form, refine
from .module import OP, KSChainLinear
from .patterns import ChainChoice, Pattern, PatternError, best_chain, check_chain, compose, \
    inner_rank, \
    product_pattern


class KSChainParams(Params):
    patterns: list[tuple[int, int, int, int]] | None = Field(default=None, description=(
        "explicit chain [[a, b, c, d], …] in the order applied (first acts on the input); its "
        "input size may exceed in_features and its output out_features (zero padding)"))
    num_factors: int = Field(default=2, ge=1, le=8, description=(
        "number of factors of the automatic chain (ignored with 'patterns')"))
    rank: int | None = Field(default=None, ge=1, description=(
        "inner rank of the automatic chain (default 1)"))
    ratio: float | None = Field(default=None, ge=0, lt=1, description=(
        "fraction of the layer's parameters to remove: the largest rank within the rest"))
    divisors: Literal["balanced", "fewest_params"] = Field(default="balanced", description=(
        "how the automatic chain picks b_ℓ, c_ℓ: most balanced (b_ℓ ≈ m^{1/L}, Monarch), or "
        "fewest parameters first (favours degenerate, nearly low-rank chains)"))
    init: Literal["closed_form", "random"] = Field(default="closed_form", description=(
        "'closed_form' = Monarch projection / hierarchical splitting; 'random' needs "
        "refine_steps"))
    refine_steps: int = Field(default=0, ge=0, description=(
        "Adam steps on the output MSE vs the dense layer after the initial fit"))
    refine_lr: float = Field(default=1e-3, gt=0)
    refine_inputs: Literal["random", "calibration"] = Field(default="random", description=(
        "'random' = Gaussian inputs (Frobenius objective); 'calibration' = the layer's "
        "calibration inputs gathered by compress"))

    @model_validator(mode="after")
    def _consistent(self):
        if self.rank is not None and self.ratio is not None:
            raise ValueError("give 'rank' or 'ratio', not both")
        if self.patterns is not None:
            given = [k for k in ("rank", "ratio") if getattr(self, k) is not None] + \
                (["divisors"] if "divisors" in self.model_fields_set else [])
            if given or "num_factors" in self.model_fields_set:
                fixed = given + (["num_factors"] if "num_factors" in self.model_fields_set else [])
                raise ValueError(f"'patterns' fixes the chain: drop {fixed}")
            try:
                check_chain(self.patterns)
            except PatternError as exc:
                raise ValueError(str(exc)) from None
        if self.init == "random" and self.refine_steps == 0:
            raise ValueError("init 'random' without refine_steps leaves an untrained chain: "
                             "set refine_steps > 0 or use init 'closed_form'")
        return self


class KSChain(Approximator):
    name = "ks_chain"
    description = "product of Kronecker-sparse (butterfly / Monarch) factors, closed-form fit"
    Params = KSChainParams
    module_class = KSChainLinear
    op = OP

    def needs_calibration(self, params) -> bool:
        return params.refine_steps > 0 and params.refine_inputs == "calibration"

    def _choice(self, view: WeightView, params) -> ChainChoice:
        """The chain for this layer; PatternError/ValueError when none fits."""
        m, n = view.shape
        if params.patterns is not None:
            pats = check_chain(params.patterns)
            if pats[0].cols < n or pats[-1].rows < m:
                raise ValueError(
                    f"patterns map {pats[0].cols} → {pats[-1].rows} but the layer is {n} → {m}: "
                    f"the first factor's a·c·d must be ≥ in_features and the last's a·b·d ≥ "
                    f"out_features")
            return ChainChoice(tuple(pats), pats[-1].rows, pats[0].cols,
                               sum(p.nnz for p in pats), (), ())
        shape = best_chain(m, n, params.num_factors, 1, divisors=params.divisors)
        if params.ratio is None:
            choice = shape.with_rank(params.rank or 1)
            cap = shape.max_useful_rank()
            if cap is not None and choice.patterns and (params.rank or 1) > cap:
                raise ValueError(f"rank {params.rank} exceeds {cap} = min(b₂, c₁) of the chain "
                                 f"{[str(p) for p in choice.patterns]}, where it is already "
                                 f"exact")
            return choice
        budget = (1 - params.ratio) * m * n
        if shape.params > budget:
            raise ValueError(f"even rank 1 ({shape.params} parameters) exceeds the budget of "
                             f"{int(budget)} left by ratio {params.ratio}")
        cap = shape.max_useful_rank() or max(m, n)
        rank = 1
        while rank < cap and shape.with_rank(rank + 1).params <= budget:
            rank += 1
        return shape.with_rank(rank)

    def check(self, view: WeightView, params) -> None:
        choice = self._choice(view, params)
        if params.init == "closed_form":
            product_pattern(choice.patterns)  # raises when the closed form does not apply

    def estimate(self, view: WeightView, params) -> Estimate:
        choice = self._choice(view, params)
        bias = view.bias is not None
        return Estimate(choice.params + (view.shape[0] if bias else 0), 2 * choice.params)

    def fit(self, view: WeightView, params, context: FitContext) -> KSChainLinear:
        m, n = view.shape
        choice = self._choice(view, params)
        pats = list(choice.patterns)
        w = F.pad(view.dense(torch.float64), (0, choice.in_padded - n, 0, choice.out_padded - m))
        gen = context.generator()
        if params.init == "closed_form":
            factors = closed_form(w, pats)
        else:
            factors = random_factors(pats, scale_to=float(w.norm()), generator=gen,
                                     dtype=torch.float64)
        details = {"patterns": [p.as_list() for p in pats], "rank": _rank_of(pats),
                   "padding": choice.padding(m, n), "init": params.init}
        if params.refine_steps:
            inputs = None
            if params.refine_inputs == "calibration":
                if context.stats is None or context.stats.samples is None:
                    raise ValueError("refine_inputs 'calibration' needs calibration data: pass "
                                     "calibration= to compress (or use refine_inputs: random)")
                inputs = F.pad(context.stats.samples.float(), (0, choice.in_padded - n))
            factors, losses = refine(factors, pats, w, inputs, steps=params.refine_steps,
                                     lr=params.refine_lr, generator=gen)
            details["refine_loss"] = [losses[0], losses[-1]]
        module = KSChainLinear(m, n, pats, bias=view.bias is not None, backend=context.backend)
        dtype = view.dtype
        with torch.no_grad():
            for p, f in zip(module.factors, factors):
                p.copy_(f)
            if view.bias is not None:
                module.bias.copy_(view.bias)
        module.fit_details = details
        return module.to(dtype=dtype, device=view.device)


def _rank_of(patterns: list[Pattern]) -> int:
    """The inner rank at the first boundary (1 for a single factor)."""
    if len(patterns) < 2 or compose(patterns[0], patterns[1]) is None:
        return 1
    return inner_rank(patterns[0], patterns[1])
