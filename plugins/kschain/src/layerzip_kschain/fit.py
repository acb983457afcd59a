"""Closed-form fit of a chain: Monarch projection for two factors, hierarchical splitting for L.

For two factors F (applied first) and G whose product has pattern P, every block of P splits
into x·y sub-blocks (x = a_G/a_F, y = d_F/d_G), each exactly a rank-r product of a piece of G
and a piece of F; the best chain is then a batch of independent rank-r truncated SVDs. For L
factors the chain is split in two halves, the 2-factor problem solved for the halves' product
patterns, and each half recursed into (Le, Zheng, Riccietti, Gribonval: the error is within a
constant factor of the best; a W that is itself such a chain is recovered exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chain import factor_from_dense
from .patterns import Pattern, PatternError, check_chain, compose, inner_rank, product_pattern


def project_pair(target: Tensor, first: Pattern, second: Pattern) -> tuple[Tensor, Tensor]:
    """Best (F, G) blocks with G·F ≈ the target factor (blocks of compose(first, second))."""
    p = compose(first, second)
    if p is None:
        raise PatternError(f"{first} then {second} do not compose")
    x, y = second.a // first.a, first.d // second.d
    r = inner_rank(first, second)
    big_a, big_d, bg, cf = p.a, p.d, second.b, first.c
    t = target.reshape(big_a, big_d, x, bg, cf, y).permute(0, 1, 2, 5, 3, 4)
    t = t.reshape(-1, bg, cf)
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    k = min(r, s.shape[-1])
    root = s[:, :k].sqrt()
    g_part = t.new_zeros(t.shape[0], bg, r)
    f_part = t.new_zeros(t.shape[0], r, cf)
    g_part[:, :, :k] = u[:, :, :k] * root[:, None, :]
    f_part[:, :k, :] = root[:, :, None] * vh[:, :k, :]
    # g_part[α, δ, I1, J2][I2, ρ] → G block (α·x + I1)·D + δ, entry [I2, ρ·y + J2]
    g = g_part.reshape(big_a, big_d, x, y, bg, r).permute(0, 2, 1, 4, 5, 3)
    g = g.reshape(big_a * x * big_d, bg, r * y)
    # f_part[α, δ, I1, J2][ρ, J1] → F block α·y·D + J2·D + δ, entry [I1·r + ρ, J1]
    f = f_part.reshape(big_a, big_d, x, y, r, cf).permute(0, 3, 1, 2, 4, 5)
    f = f.reshape(big_a * y * big_d, x * r, cf)
    return f, g


def project_chain(target: Tensor, patterns) -> list[Tensor]:
    """Blocks of every factor for a target given as blocks of the chain's product pattern."""
    pats = check_chain(patterns)
    if len(pats) == 1:
        return [target]
    s = len(pats) // 2
    first, second = product_pattern(pats[:s]), product_pattern(pats[s:])
    f, g = project_pair(target, first, second)
    return project_chain(f, pats[:s]) + project_chain(g, pats[s:])


def closed_form(w: Tensor, patterns) -> list[Tensor]:
    """The closed-form chain for a dense W already padded to the chain's size (float64 inside;
    entries outside the product's support, if it is not dense, cannot be represented)."""
    pats = check_chain(patterns)
    p = product_pattern(pats)
    if tuple(w.shape) != (p.rows, p.cols):
        raise PatternError(f"weight of shape {tuple(w.shape)} but the chain is {p.rows}×{p.cols}")
    return project_chain(factor_from_dense(w.double(), p), pats)


def refine(factors: list[Tensor], patterns, w: Tensor, inputs: Tensor | None, *, steps: int,
           lr: float = 1e-3, batch: int = 256, generator: torch.Generator | None = None
           ) -> tuple[list[Tensor], list[float]]:
    """Adam on the relative output MSE ‖chain(x) − x Wᵀ‖² / ‖x Wᵀ‖² (float32).

    ``inputs`` (N, n_padded) are sampled in minibatches; None draws standard Gaussian inputs
    (the objective is then the Frobenius error of the product). Returns the refined factors
    (detached) and the loss per step."""
    from .chain import chain_matmul_bmm

    pats = check_chain(patterns)
    params = [f.detach().float().clone().requires_grad_(True) for f in factors]
    target_w = w.float()
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        if inputs is None:
            x = torch.randn(batch, pats[0].cols, generator=generator)
        else:
            idx = torch.randint(0, inputs.shape[0], (batch,), generator=generator)
            x = inputs[idx].float()
        target = x @ target_w.t()
        out = chain_matmul_bmm(x, params, pats)
        loss = (out - target).square().sum() / target.square().sum().clamp_min(1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [p.detach() for p in params], losses
