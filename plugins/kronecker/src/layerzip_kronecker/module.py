"""KroneckerLinear: y = Σₖ (Aₖ ⊗ Bₖ) x + S x + b, never materializing the (m × n) weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import layerzip
from layerzip import ApproxModule

OP = "kron_matmul"
RESIDUAL_STRUCTURES = ("entries", "blocks", "columns")


def kron_matmul_reference(x: Tensor, a: Tensor, b: Tensor, res_idx: Tensor | None,
                          res_val: Tensor | None, bias: Tensor | None) -> Tensor:
    """The vec trick: for x reshaped to X (T, n1, n2), (A ⊗ B) vec(X) = vec(A X Bᵀ), computed
    as A @ (X @ Bᵀ) per term (the fastest plain-torch order measured on the H100); the residual
    is a sparse (m × n) CSR matrix built from the sorted flat indices, applied to xᵀ (a gather of
    x's columns would materialize T × nnz)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    lead = x.shape[:-1]
    n = n1 * n2
    x3 = x.reshape(-1, n1, n2)
    y = None
    for k in range(r):
        term = torch.matmul(a[k], x3 @ b[k].t())  # (T, m1, m2)
        y = term if y is None else y + term
    return add_residual_and_bias(y.reshape(-1, m1 * m2), x3.reshape(-1, n), res_idx, res_val,
                                 bias).reshape(*lead, m1 * m2)


def add_block_residual(y: Tensor, x2: Tensor, blocks: Tensor, values: Tensor,
                       n1: int) -> Tensor:
    """y (T, m1·m2) + Σ_b (E_{p q} ⊗ S_b) x2: block b = p·n1 + q of the factor grid holds
    S_b = values[b] (m2 × n2) — for every token, Y[p, :] += X[q, :] S_bᵀ (x2 viewed as (T, n1,
    n2)). A gather of the blocks' x rows, one batched product, an index_add over block rows;
    differentiable in x2 and values."""
    nb, m2, n2 = values.shape
    t = x2.shape[0]
    idx = blocks.long()
    xq = x2.reshape(t, n1, n2).index_select(1, idx % n1)                  # (T, nb, n2)
    contrib = torch.einsum("tbl,bjl->tbj", xq, values.to(x2.dtype))       # (T, nb, m2)
    y3 = y.reshape(t, -1, m2).index_add(1, idx // n1, contrib.to(y.dtype))
    return y3.reshape(t, -1)


def add_column_residual(y: Tensor, x2: Tensor, columns: Tensor, values: Tensor) -> Tensor:
    """y (T, m) + x2[:, columns] valuesᵀ: whole input columns of the residual (values: m × k,
    column i for input feature columns[i]) — a gather of k columns of x and one tensor-core
    product. Differentiable in x2 and values."""
    return y + x2.index_select(1, columns.long()) @ values.to(x2.dtype).t()


def add_residual_and_bias(y: Tensor, x2: Tensor, res_idx: Tensor | None,
                          res_val: Tensor | None, bias: Tensor | None) -> Tensor:
    """y (T, m) + S x2 (T, n) + bias. S is the sparse residual: with res_val of shape (nnz,),
    single entries at sorted flat indices; with res_val of shape (nb, m2, n2), whole blocks of
    the factor grid at block indices p·n1 + q (see :func:`add_block_residual`); with res_val
    of shape (m, k), whole input columns at sorted column indices."""
    n = x2.shape[-1]
    if res_val is not None and res_val.dim() == 2:
        if res_idx.numel():
            y = add_column_residual(y, x2, res_idx, res_val)
    elif res_val is not None and res_val.dim() == 3:
        if res_idx.numel():
            y = add_block_residual(y, x2, res_idx, res_val, n // res_val.shape[2])
    elif res_idx is not None and res_idx.numel():
        m = y.shape[-1]
        idx = res_idx.long()
        rows = idx // n  # the flat indices are sorted, so rows are too: CSR directly
        # row pointers by binary search, not bincount: no device-to-host sync, so a forward
        # with a residual can be captured in a CUDA graph
        crow = torch.searchsorted(rows, torch.arange(m + 1, device=idx.device))
        # float32: half-precision sparse products are not supported on every device. CSR with
        # a contiguous right-hand side measured 5.3× faster than COO on the H100 (1.16 vs
        # 6.16 ms for 168k nonzeros at T=8192; benchmarks/results/kronecker_residual_probe.txt)
        work = torch.float32 if res_val.dtype in (torch.bfloat16, torch.float16) else \
            res_val.dtype
        s = torch.sparse_csr_tensor(crow, idx % n, res_val.to(work), (m, n),
                                    check_invariants=False)
        y = y + (s @ x2.t().contiguous().to(work)).t().to(y.dtype)
    if bias is not None:
        y = y + bias
    return y


class KroneckerLinear(ApproxModule):
    """Factors A (r, m1, n1) and B (r, m2, n2) (the scale α folded into A), an optional sparse
    residual (no dense copy) and the bias. The residual is ``residual_structure`` 'entries':
    sorted flat int32 indices + values (nnz,); 'blocks': sorted block indices p·n1 + q +
    values (nb, m2, n2); or 'columns': sorted input-column indices + values (m, k)."""

    def __init__(self, out_features: int, in_features: int, factors, rank: int, nnz: int = 0,
                 bias: bool = True, backend: str = "auto", residual_structure: str = "entries"):
        super().__init__()
        (m1, n1), (m2, n2) = factors
        if residual_structure not in RESIDUAL_STRUCTURES:
            raise ValueError(f"residual_structure must be one of {RESIDUAL_STRUCTURES}, got "
                             f"{residual_structure!r}")
        if m1 * m2 != out_features or n1 * n2 != in_features:
            raise ValueError(f"factors {factors} do not multiply to {out_features}×{in_features}")
        self.out_features, self.in_features, self.rank = int(out_features), int(in_features), \
            int(rank)
        self.factors = [[int(m1), int(n1)], [int(m2), int(n2)]]
        self.a = nn.Parameter(torch.zeros(rank, m1, n1))
        self.b = nn.Parameter(torch.zeros(rank, m2, n2))
        # nnz indices: flat entry indices, block indices p·n1 + q with (m2 × n2) values each,
        # or input-column indices with a column of out_features values each
        self.residual_structure = residual_structure
        self.register_buffer("res_idx", torch.zeros(nnz, dtype=torch.int32))
        self.res_val = nn.Parameter(torch.zeros(
            {"blocks": (nnz, m2, n2), "columns": (out_features, nnz)}.get(residual_structure,
                                                                          (nnz,))))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        kernel = layerzip.get_backend(OP, backend)
        self.backend_name, self._kernel = kernel.name, kernel
        self._reference = layerzip.get_registry().reference_backend(OP)

    def forward(self, x):
        kernel = self._kernel if self._kernel.accepts(x, self.a, self.b, self.res_val, self.bias) \
            else self._reference
        return kernel(x, self.a, self.b, self.res_idx, self.res_val, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        from .factorize import kron_sum, rearrange

        w = kron_sum(self.a.double(), self.b.double())
        if self.res_idx.numel() and self.residual_structure == "blocks":
            (m1, n1), (m2, n2) = self.factors
            r_w = rearrange(w, m1, n1, m2, n2)  # a copy: block (p, q) is row p·n1 + q
            r_w.index_add_(0, self.res_idx.long(), self.res_val.double().reshape(-1, m2 * n2))
            w = r_w.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)
        elif self.res_idx.numel() and self.residual_structure == "columns":
            w[:, self.res_idx.long()] += self.res_val.double()
        elif self.res_idx.numel():
            w.view(-1).index_add_(0, self.res_idx.long(), self.res_val.double())
        return w.float()

    def config(self) -> dict:
        return {"out_features": self.out_features, "in_features": self.in_features,
                "factors": self.factors, "rank": self.rank, "nnz": int(self.res_idx.numel()),
                "bias": self.bias is not None, "backend": self.backend_name,
                "residual_structure": self.residual_structure}

    @classmethod
    def from_config(cls, config: dict) -> KroneckerLinear:
        return cls(**config)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"factors={self.factors}, rank={self.rank}, residual_nnz={self.res_val.numel()}"
                f"{_residual_repr(self.residual_structure, self.res_idx.numel())}")


def _residual_repr(structure: str, count: int) -> str:
    return {"blocks": f" in {count} blocks", "columns": f" in {count} columns"}.get(structure, "")
