"""WeightView: a layer's weight seen as the linear operator y = x Wᵀ + b with W of shape (out, in).

Methods read weights only through a view, so a layer that stores W transposed (GPT-2's Conv1D) or
in factored form (cirkit's Kronecker-structured sum layers) never forces them to special-case it,
and pivot strategies can take rows/columns without materializing a huge W.
"""

from __future__ import annotations

import torch
from torch import Tensor


class WeightView:
    """Read-only access to W (out_features × in_features) and the bias.

    Subclasses implement :meth:`dense`; :meth:`rows`, :meth:`cols` and the norms default to slicing
    it and should be overridden when W is stored in factored form. ``structure`` names any known
    structure (e.g. ``{"kronecker": (A, B)}``) so structure-aware methods can exploit it.
    """

    out_features: int
    in_features: int

    def __init__(self, out_features: int, in_features: int, *, bias: Tensor | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 structure: dict | None = None):
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        self._bias = bias
        self.dtype = dtype
        self.device = torch.device(device)
        self.structure = dict(structure or {})

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def bias(self) -> Tensor | None:
        """The bias (out_features,), detached, in float32; None when the layer has none."""
        return None if self._bias is None else self._bias.detach().float()

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W as a new (out, in) tensor; modifying it never touches the layer."""
        raise NotImplementedError

    def rows(self, idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """W[idx, :] as (len(idx), in)."""
        return self.dense(dtype)[idx]

    def cols(self, idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """W[:, idx] as (out, len(idx))."""
        return self.dense(dtype)[:, idx]

    def col_norms(self) -> Tensor:
        """Euclidean norm of each column of W, (in,) float32."""
        return torch.linalg.vector_norm(self.dense(), dim=0)

    def row_norms(self) -> Tensor:
        """Euclidean norm of each row of W, (out,) float32."""
        return torch.linalg.vector_norm(self.dense(), dim=1)

    def frobenius_norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.dense().double()))


class DenseWeightView(WeightView):
    """View of a dense weight tensor, stored (out, in) or transposed (in, out) as in GPT-2's
    Conv1D."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, transposed: bool = False):
        out_f, in_f = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        super().__init__(out_f, in_f, bias=bias, dtype=weight.dtype, device=weight.device)
        self._weight = weight
        self.transposed = transposed

    def _w(self) -> Tensor:
        w = self._weight.detach()
        return w.t() if self.transposed else w

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._w().to(dtype=dtype, copy=True).contiguous()

    def rows(self, idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._w()[idx].to(dtype=dtype, copy=True)

    def cols(self, idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._w()[:, idx].to(dtype=dtype, copy=True)

    def col_norms(self) -> Tensor:
        return torch.linalg.vector_norm(self._w().float(), dim=0)

    def row_norms(self) -> Tensor:
        return torch.linalg.vector_norm(self._w().float(), dim=1)
