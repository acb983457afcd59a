"""The `nystrom` method (CUR): W ≈ C U R with C = W[:, J], R = W[I, :], U = pinv(W[I, J])."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import layerzip
from layerzip import Approximator, ApproxModule, Estimate, FitContext, Params, WeightView


class NystromLinear(ApproxModule):
    """y = ((x Rᵀ) Mᵀ) + b with R (k × in) the pivot rows and M = C U (out × k)."""

    def __init__(self, out_features: int, in_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.out_features, self.in_features, self.rank = out_features, in_features, rank
        self.rows = nn.Parameter(torch.zeros(rank, in_features))
        self.mix = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return F.linear(F.linear(x, self.rows), self.mix, self.bias)

    @torch.no_grad()
    def dense_weight(self):
        return (self.mix.double() @ self.rows.double()).float()

    def config(self) -> dict:
        return {"out_features": self.out_features, "in_features": self.in_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict) -> NystromLinear:
        return cls(**config)


class NystromParams(Params):
    rank: int = Field(gt=0, description="number k of pivot rows and of pivot columns")
    pivots: str = Field(default="leverage", description="a registered pivot strategy")
    selection: Literal["sample", "top"] = Field(default="sample", description=(
        "'sample': seeded random draw weighted by the strategy's scores; 'top': the k highest "
        "scores (deterministic; uniform has no scores and always samples)"))
    replace: bool = Field(default=False, description="sample with replacement")
    middle: Literal["intersection", "optimal"] = Field(default="intersection", description=(
        "'intersection': U = pinv(W[I, J]) (classic Nyström; can be unstable when the "
        "intersection is ill-conditioned); 'optimal': U = C⁺ W R⁺, the best middle for the chosen "
        "pivots (error never above the intersection's; reads W once through the view)"))
    rcond: float = Field(default=1e-10, gt=0, lt=1, description="pinv cut-off, relative")


class Nystrom(Approximator):
    name = "nystrom"
    description = "CUR/Nyström: k pivot rows and columns, U = pinv of their intersection"
    Params = NystromParams
    module_class = NystromLinear

    def check(self, view: WeightView, params) -> None:
        layerzip.get_pivot_strategy(params.pivots)  # unknown strategy → SpecError
        if params.rank > min(view.shape):
            raise ValueError(f"rank {params.rank} exceeds min(out, in) = {min(view.shape)}")

    def estimate(self, view: WeightView, params) -> Estimate:
        m, n = view.shape
        k = params.rank
        return Estimate(k * (m + n) + (m if view.bias is not None else 0), 2 * k * (m + n))

    def _pick(self, view, params, axis, generator):
        strategy = layerzip.get_pivot_strategy(params.pivots)
        if params.selection == "top" and hasattr(strategy, "scores"):
            try:
                scores = strategy.scores(view, axis, params.rank)
            except TypeError:  # strategies whose scores do not depend on k
                scores = strategy.scores(view, axis)
            return torch.topk(scores, params.rank).indices.sort().values
        return strategy.select(view, params.rank, axis, generator=generator,
                               replace=params.replace)

    def fit(self, view: WeightView, params, context: FitContext) -> NystromLinear:
        g = context.generator()
        cols = self._pick(view, params, "cols", g)
        rows = self._pick(view, params, "rows", g)
        c = view.cols(cols, torch.float64)             # (m, k)
        r = view.rows(rows, torch.float64)             # (k, n)
        if params.middle == "optimal":
            w = view.dense(torch.float64)
            u = torch.linalg.pinv(c, rtol=params.rcond) @ w @ torch.linalg.pinv(
                r, rtol=params.rcond)
        else:
            u = torch.linalg.pinv(c[rows], rtol=params.rcond)  # pinv of W[I, J]
        module = NystromLinear(view.out_features, view.in_features, params.rank,
                               view.bias is not None)
        with torch.no_grad():
            module.rows.copy_(r)
            module.mix.copy_(c @ u)
            if module.bias is not None:
                module.bias.copy_(view.bias)
        module.fit_details = {"rank": params.rank, "pivots": params.pivots, "middle": params.middle,
                              "distinct_rows": int(rows.unique().numel()),
                              "distinct_cols": int(cols.unique().numel())}
        return module
