"""KSChainLinear: y = K_L ⋯ K_1 x + b with each K_ℓ stored as its blocks, never densified."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import layerzip
from layerzip import ApproxModule

from .chain import chain_dense
from .patterns import Pattern, check_chain

OP = "ks_matmul"


class KSChainLinear(ApproxModule):
    """A chain of Kronecker-sparse factors (``patterns`` in the order applied). When the chain is
    larger than the layer (padding, for sizes that don't factor), inputs are zero-padded and
    outputs cut; the padding is part of ``config()``."""

    def __init__(self, out_features: int, in_features: int, patterns, bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        pats = check_chain(patterns)
        if pats[0].cols < in_features or pats[-1].rows < out_features:
            raise ValueError(f"chain {[str(p) for p in pats]} maps {pats[0].cols} → "
                             f"{pats[-1].rows}, smaller than the layer's {in_features} → "
                             f"{out_features}")
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.patterns = pats
        self.factors = nn.ParameterList([nn.Parameter(torch.zeros(p.num_blocks, p.b, p.c))
                                         for p in pats])
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        kernel = layerzip.get_backend(OP, backend)
        self.backend_name, self._kernel = kernel.name, kernel
        self._reference = layerzip.get_registry().reference_backend(OP)

    @property
    def in_padded(self) -> int:
        return self.patterns[0].cols

    @property
    def out_padded(self) -> int:
        return self.patterns[-1].rows

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.in_padded > self.in_features:
            x2 = F.pad(x2, (0, self.in_padded - self.in_features))
        # by index, not by iterating the ParameterList: dynamo (torch 2.11) cannot unpack its
        # iterator, a generator, in a call under torch.compile(fullgraph=True)
        factors = [self.factors[i] for i in range(len(self.factors))]
        kernel = self._kernel if self._kernel.accepts(x2, *factors) else self._reference
        y = kernel(x2, factors, self.patterns, False)
        if self.out_padded > self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        w = chain_dense([f.double() for f in self.factors], self.patterns)
        return w[: self.out_features, : self.in_features].float()

    def config(self) -> dict:
        return {"out_features": self.out_features, "in_features": self.in_features,
                "patterns": [p.as_list() for p in self.patterns], "bias": self.bias is not None,
                "backend": self.backend_name}

    @classmethod
    def from_config(cls, config: dict) -> KSChainLinear:
        return cls(**config)

    def extra_repr(self) -> str:
        pad = ""
        if self.in_padded > self.in_features or self.out_padded > self.out_features:
            pad = f", padded={self.out_padded}×{self.in_padded}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"patterns={[str(p) for p in self.patterns]}{pad}")


__all__ = ["KSChainLinear", "OP", "Pattern"]
