"""Van Loan–Pitsianis: the best sum of r Kronecker products in Frobenius norm.

For W of shape (m1·m2) × (n1·n2), the rearrangement R(W) turns each m2×n2 block W[i1, j1] into
row i1·n1 + j1 of an (m1·n1) × (m2·n2) matrix, so that R(A ⊗ B) = vec(A) vec(B)ᵀ. R is a
permutation of entries (an isometry), hence ‖W − Σ Aₖ⊗Bₖ‖ = ‖R(W) − Σ vec(Aₖ)vec(Bₖ)ᵀ‖ and the
rank-r truncated SVD of R(W) is optimal (Eckart–Young) with error √(Σ_{i>r} σᵢ²).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rearrange(w: Tensor, m1: int, n1: int, m2: int, n2: int) -> Tensor:
    """R(W): (m1·n1) × (m2·n2)."""
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_sum(a: Tensor, b: Tensor) -> Tensor:
    """Σₖ a[k] ⊗ b[k] as a dense (m1·m2) × (n1·n2) matrix (for tests and error checks)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return torch.einsum("kij,kab->iajb", a, b).reshape(m1 * m2, n1 * n2)


def nearest_kronecker(w: Tensor, m1: int, n1: int, m2: int, n2: int, rank: int):
    """(A (r, m1, n1), B (r, m2, n2), singular values of R(W)) for the best rank-r sum."""
    u, s, vh = torch.linalg.svd(rearrange(w, m1, n1, m2, n2), full_matrices=False)
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).t().reshape(rank, m1, n1)
    b = (vh[:rank].t() * root).t().reshape(rank, m2, n2)
    return a, b, s


def tail_error(s: Tensor, rank: int) -> float:
    """√(Σ_{i ≥ rank} σᵢ²): the Frobenius error of the rank-`rank` truncation."""
    return float(s.double()[rank:].square().sum().sqrt())


def divisors(k: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(k) + 1) if k % d == 0]
    return sorted(set(small + [k // d for d in small]))


def balanced_divisors(k: int, count: int = 4) -> list[int]:
    """The `count` nontrivial divisors of k closest to √k on a log scale (both sides)."""
    ds = [d for d in divisors(k) if 1 < d < k] or [1]
    return sorted(ds, key=lambda d: abs(math.log(d) - 0.5 * math.log(k)))[:count]


def kron_params(m1: int, n1: int, m2: int, n2: int, rank: int) -> int:
    return rank * (m1 * n1 + m2 * n2)
