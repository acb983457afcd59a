"""A WeightView of W = A ⊗ B that never materializes W (rows, columns and norms from factors)."""

from __future__ import annotations

import torch
from torch import Tensor

import layerzip
from layerzip import WeightView


class KroneckerWeightView(WeightView):
    """W = A ⊗ B with A (m1 × n1), B (m2 × n2): W[(i1, i2), (j1, j2)] = A[i1, j1]·B[i2, j2],
    flat index i = i1·m2 + i2 (rows), j = j1·n2 + j2 (columns)."""

    def __init__(self, a: Tensor, b: Tensor, bias: Tensor | None = None):
        (m1, n1), (m2, n2) = a.shape, b.shape
        super().__init__(m1 * m2, n1 * n2, bias=bias, dtype=a.dtype, device=a.device,
                         structure={"kronecker": (a, b)})
        self.a, self.b = a.detach(), b.detach()

    def dense(self, dtype=torch.float32) -> Tensor:
        return torch.kron(self.a.to(dtype), self.b.to(dtype))

    def rows(self, idx: Tensor, dtype=torch.float32) -> Tensor:
        m2 = self.b.shape[0]
        i1, i2 = idx // m2, idx % m2
        # row (i1, i2) = A[i1, :] ⊗ B[i2, :]
        return (self.a.to(dtype)[i1][:, :, None] * self.b.to(dtype)[i2][:, None, :]).reshape(
            len(idx), -1)

    def cols(self, idx: Tensor, dtype=torch.float32) -> Tensor:
        n2 = self.b.shape[1]
        j1, j2 = idx // n2, idx % n2
        return (self.a.to(dtype)[:, j1][:, None, :] * self.b.to(dtype)[:, j2][None, :, :]
                ).reshape(-1, len(idx))

    def col_norms(self) -> Tensor:
        # ‖col_(j1, j2)‖ = ‖A[:, j1]‖·‖B[:, j2]‖
        na = torch.linalg.vector_norm(self.a.float(), dim=0)
        nb = torch.linalg.vector_norm(self.b.float(), dim=0)
        return (na[:, None] * nb[None, :]).reshape(-1)

    def row_norms(self) -> Tensor:
        na = torch.linalg.vector_norm(self.a.float(), dim=1)
        nb = torch.linalg.vector_norm(self.b.float(), dim=1)
        return (na[:, None] * nb[None, :]).reshape(-1)


class SymbolicKroneckerView(WeightView):
    """The shape of W = A ⊗ B for a layer that has no values yet (a symbolic cirkit circuit's sum
    layer before compilation): enough to plan, with A (m1 × n1) and B (m2 × n2) shapes."""

    def __init__(self, a_shape: tuple[int, int], b_shape: tuple[int, int]):
        (m1, n1), (m2, n2) = a_shape, b_shape
        super().__init__(m1 * m2, n1 * n2, structure={"kronecker_shapes": (a_shape, b_shape)})

    def dense(self, dtype=torch.float32) -> Tensor:
        raise layerzip.LayerzipError("a symbolic circuit layer has no weight values until it is "
                                     "compiled; compile it (layerzip_nystrom.compile_circuit)")
