"""Stored factors, their dense form, and the bmm formulation of the product.

A factor with pattern (a, b, c, d) is stored as its blocks, a tensor (a·d, b, c) whose block
α·d + δ sits at rows α·b·d + β·d + δ, columns α·c·d + γ·d + δ (see patterns.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .patterns import Pattern, check_chain


def factor_dense(blocks: Tensor, pattern: Pattern) -> Tensor:
    """The (a·b·d) × (a·c·d) matrix of one factor: blocks placed at their interleaved rows and
    columns, i.e. Σ_{α,δ} e_α e_αᵀ ⊗ B_{αδ} ⊗ e_δ e_δᵀ."""
    a, b, c, d = pattern.a, pattern.b, pattern.c, pattern.d
    blk = blocks.reshape(a, d, b, c)
    eye_a = torch.eye(a, dtype=blocks.dtype, device=blocks.device)
    eye_d = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    # out[α, β, δ, α', γ, δ'] = B[α, δ, β, γ] · [α = α'] · [δ = δ']
    full = torch.einsum("adbc,ae,df->abdecf", blk, eye_a, eye_d)
    return full.reshape(a * b * d, a * c * d)


def chain_dense(factors, patterns) -> Tensor:
    """K_L ⋯ K_1 as one dense matrix (rows = last factor's output, cols = first's input)."""
    pats = check_chain(patterns)
    w = None
    for blocks, p in zip(factors, pats):
        k = factor_dense(blocks, p)
        w = k if w is None else k @ w
    return w


def block_indices(pattern: Pattern, device=None) -> tuple[Tensor, Tensor]:
    """Row (a·d, b) and column (a·d, c) indices of every block's entries in the dense factor."""
    a, b, c, d = pattern.a, pattern.b, pattern.c, pattern.d
    al = torch.arange(a, device=device).view(a, 1, 1)
    de = torch.arange(d, device=device).view(1, d, 1)
    rows = al * (b * d) + torch.arange(b, device=device).view(1, 1, b) * d + de
    cols = al * (c * d) + torch.arange(c, device=device).view(1, 1, c) * d + de
    return rows.reshape(a * d, b), cols.reshape(a * d, c)


def factor_from_dense(w: Tensor, pattern: Pattern) -> Tensor:
    """The blocks of a dense (a·b·d) × (a·c·d) matrix on the pattern's support (the inverse of
    factor_dense there; entries off the support are dropped)."""
    rows, cols = block_indices(pattern, w.device)
    return w[rows[:, :, None], cols[:, None, :]]


def factor_matmul(x: Tensor, blocks: Tensor, p: Pattern, batch_last: bool = False) -> Tensor:
    """One factor by permute → torch.bmm over the a·d blocks → permute.

    batch-first: x (T, a·c·d) → (T, a·b·d); batch-last: x (a·c·d, T) → (a·b·d, T)."""
    a, b, c, d = p.a, p.b, p.c, p.d
    if batch_last:
        t = x.shape[-1]
        xb = x.reshape(a, c, d, t).permute(0, 2, 1, 3).reshape(a * d, c, t)
        yb = torch.bmm(blocks, xb)  # (a·d, b, T)
        return yb.reshape(a, d, b, t).permute(0, 2, 1, 3).reshape(a * b * d, t)
    t = x.shape[0]
    xb = x.reshape(t, a, c, d).permute(1, 3, 0, 2).reshape(a * d, t, c)
    yb = torch.bmm(xb, blocks.transpose(1, 2))  # (a·d, T, b)
    return yb.reshape(a, d, t, b).permute(2, 0, 3, 1).reshape(t, a * b * d)


def chain_matmul_bmm(x: Tensor, factors, patterns, batch_last: bool = False) -> Tensor:
    """The whole chain on a 2-D input (batch-first (T, n) or batch-last (n, T))."""
    for blocks, p in zip(factors, patterns):
        x = factor_matmul(x, blocks, p, batch_last)
    return x


def random_factors(patterns, *, scale_to: float | None = None, generator=None,
                   dtype=torch.float32) -> list[Tensor]:
    """Gaussian blocks with variance 1/c per factor (each factor roughly norm-preserving); with
    ``scale_to`` the product's expected Frobenius norm is matched to it."""
    out = []
    for p in patterns:
        out.append(torch.randn(p.num_blocks, p.b, p.c, generator=generator, dtype=torch.float64)
                   / math.sqrt(p.c))
    if scale_to is not None and patterns:
        # E‖K_L⋯K_1‖_F² = (∏ b_ℓ/c_ℓ) · cols for this init; spread the correction evenly
        expected = math.sqrt(patterns[0].cols * math.prod(p.b / p.c for p in patterns))
        gain = (scale_to / max(expected, 1e-30)) ** (1 / len(patterns))
        out = [f * gain for f in out]
    return [f.to(dtype) for f in out]
