"""A test-only plugin that exercises the core: 'toy_lowrank' (rank-r SVD) and its backends."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

import layerzip
from layerzip import Approximator, ApproxModule, Backend, Estimate, Params


class ToyBackend(Backend):
    op = "toy_matmul"
    name = "torch"
    priority = 0
    reference = True

    def __call__(self, x, u, v, bias):
        y = (x @ v) @ u.t()
        return y if bias is None else y + bias


class ToyFastBackend(ToyBackend):
    name = "fast"
    priority = 10

    def available(self):
        return False, "needs an imaginary accelerator"


class ToyLowRank(ApproxModule):
    def __init__(self, out_features, in_features, rank, bias=True, backend="torch"):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.zeros(out_features, rank))
        self.v = nn.Parameter(torch.zeros(in_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.backend_name = backend
        self._kernel = layerzip.get_backend("toy_matmul", backend)

    def forward(self, x):
        return self._kernel(x, self.u, self.v, self.bias)

    def config(self):
        return {"out_features": self.out_features, "in_features": self.in_features,
                "rank": self.rank, "bias": self.bias is not None, "backend": self.backend_name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class ToyParams(Params):
    rank: int = Field(gt=0)
    use_calibration: bool = False
    fail_at: int | None = None


class ToyApproximator(Approximator):
    name = "toy_lowrank"
    description = "test-only truncated SVD"
    Params = ToyParams
    module_class = ToyLowRank
    op = "toy_matmul"
    calls: ClassVar[int] = 0
    seen_stats: ClassVar[list] = []

    def needs_calibration(self, params):
        return params.use_calibration

    def check(self, view, params):
        if params.rank > min(view.shape):
            raise ValueError(f"rank {params.rank} exceeds min(out, in) = {min(view.shape)}")

    def estimate(self, view, params):
        r, (m, n) = params.rank, view.shape
        return Estimate(r * (m + n) + (m if view.bias is not None else 0), 2 * r * (m + n))

    def fit(self, view, params, context):
        type(self).calls += 1
        if params.fail_at is not None and type(self).calls >= params.fail_at:
            raise RuntimeError(f"planned failure at call {type(self).calls}")
        if params.use_calibration:
            assert context.stats is not None and context.stats.gram is not None
            type(self).seen_stats.append(context.stats)
        w = view.dense(torch.float64)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = params.rank
        backend = layerzip.get_backend(self.op, context.backend).name
        m = ToyLowRank(view.out_features, view.in_features, r, view.bias is not None, backend)
        with torch.no_grad():
            m.u.copy_(u[:, :r] * s[:r])
            m.v.copy_(vh[:r].t())
            if m.bias is not None:
                m.bias.copy_(view.bias)
        return m


@layerzip.hookimpl
def register_approximators(register):
    register(ToyApproximator())


@layerzip.hookimpl
def register_backends(register):
    register(ToyBackend())
    register(ToyFastBackend())
