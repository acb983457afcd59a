"""LowRankLinear: y = (x V) Uᵀ + b, the replacement every low-rank method produces."""

from __future__ import annotations

import torch
from torch import nn

import layerzip
from layerzip import ApproxModule

from .backends import OP


class LowRankLinear(ApproxModule):
    """U (out×r) and V (in×r) (+ bias). The forward runs on the backend chosen at fit time and
    falls back to the reference kernel for inputs that backend does not handle."""

    def __init__(self, out_features: int, in_features: int, rank: int, bias: bool = True,
                 backend: str = "auto", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), \
            int(rank)
        kw = {"dtype": dtype, "device": device}
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.set_backend(backend)

    def set_backend(self, name: str) -> None:
        kernel = layerzip.get_backend(OP, name)
        self.backend_name = kernel.name
        self._kernel = kernel
        self._reference = layerzip.get_registry().reference_backend(OP)

    def forward(self, x):
        kernel = self._kernel if self._kernel.accepts(x, self.u, self.v, self.bias) \
            else self._reference
        return kernel(x, self.u, self.v, self.bias)

    @torch.no_grad()
    def dense_weight(self):
        return (self.u.double() @ self.v.double().t()).float()

    def config(self) -> dict:
        return {"out_features": self.out_features, "in_features": self.in_features,
                "rank": self.rank, "bias": self.bias is not None, "backend": self.backend_name}

    @classmethod
    def from_config(cls, config: dict) -> LowRankLinear:
        try:
            return cls(**config)
        except layerzip.SpecError:  # saved with a backend this machine lacks (e.g. fp8)
            return cls(**{**config, "backend": "auto"})

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}, backend={self.backend_name}")
