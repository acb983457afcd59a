"""Kronecker-sparse factor products in Triton, forward and backward, both layouts.

One factor (a, b, c, d) with blocks W (a·d, b, c): y[t, α·b·d + β·d + δ] = Σ_γ W[α·d+δ, β, γ] ·
x[t, α·c·d + γ·d + δ]. A program owns one block (α, δ), a tile of BT tokens and BB outputs,
and loops over c in BK steps with tensor-core dots (fp32 accumulation). The input and output are
addressed through (token, feature) strides, so the same kernel reads batch-first (T × n) and
batch-last (n × T) data in place — no permutation kernels; the block index is the fastest grid
axis so the programs of neighbouring δ, which share the same cache lines of a batch-first input
when d > 1, run together. Sizes below 16 (down to 2×2 blocks) are padded with masks: correct,
and slower per useful FLOP.

Backward: dX is the same kernel on the transposed pattern (a, c, b, d) reading W through swapped
strides; dW[blk] = Σ_t dY_blkᵀ X_blk is a second kernel that splits the token range over
programs (partial sums in fp32, added by one torch.sum) so that few large blocks still fill
the GPU. Autotuning is keyed on the pattern and layout, not on T (and T is not specialized), so
a new batch size reuses the compiled kernels.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from layerzip import triton_interpreted

from .patterns import Pattern

INTERPRET = triton_interpreted()
# batch-first factors with d ≥ this use the 3-D kernel (runs of δ loaded contiguously)
MIN_D_3D = 4


def _p2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BT": 16, "BB": 16, "BK": 16}, num_warps=1)]
    shapes = [(128, 64, 64, 4, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4), (128, 32, 32, 4, 4),
              (64, 128, 64, 8, 3), (256, 64, 32, 8, 3), (128, 16, 16, 4, 2), (64, 32, 16, 4, 3)]
    return [triton.Config({"BT": bt, "BB": bb, "BK": bk}, num_warps=w, num_stages=s)
            for bt, bb, bk, w, s in shapes]


def _fwd3d_configs():
    if INTERPRET:
        return [triton.Config({"BT": 16, "BB": 16, "BK": 16, "BD": 2}, num_warps=1)]
    shapes = [(64, 64, 32, 4, 4, 3), (32, 64, 64, 8, 4, 3), (64, 32, 32, 8, 4, 3),
              (128, 64, 32, 2, 8, 3), (32, 128, 32, 4, 8, 3), (16, 16, 16, 16, 4, 2)]
    return [triton.Config({"BT": bt, "BB": bb, "BK": bk, "BD": bd}, num_warps=w, num_stages=s)
            for bt, bb, bk, bd, w, s in shapes]


def _dw_configs():
    if INTERPRET:
        return [triton.Config({"BT": 16, "BB": 16, "BC": 16}, num_warps=1)]
    shapes = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 32, 32, 4, 4),
              (128, 16, 16, 4, 2)]
    return [triton.Config({"BT": bt, "BB": bb, "BC": bc}, num_warps=w, num_stages=s)
            for bt, bb, bc, w, s in shapes]


def _prune(sizes):
    """Drop configs whose tiles exceed the (padded) block sizes: they only add masked work."""

    def prune(configs, named_args, **kwargs):
        caps = {k: _p2(named_args[v]) for k, v in sizes.items()}
        kept, seen = [], set()
        for cfg in configs:
            key = tuple(min(cfg.kwargs[k], caps.get(k, cfg.kwargs[k])) for k in sorted(cfg.kwargs))
            if key in seen:
                continue
            seen.add(key)
            kw = {k: min(v, caps.get(k, v)) for k, v in cfg.kwargs.items()}
            kept.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        return kept

    return prune


if triton is not None:

    @triton.autotune(configs=_fwd_configs(), key=["A", "B", "C", "D", "X_TOKEN_MAJOR"],
                     prune_configs_by={"early_config_prune": _prune({"BB": "B", "BK": "C"})})
    @triton.jit(do_not_specialize=["T"])
    def _ks_fwd(x_ptr, w_ptr, y_ptr, T, A, B, C, D, sx_t, sx_f, sy_t, sy_f, sw_blk, sw_b, sw_c,
                X_TOKEN_MAJOR: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr,
                BB: tl.constexpr, BK: tl.constexpr):
        blk = tl.program_id(0)
        tile = tl.program_id(1)
        n_bt = tl.cdiv(B, BB)
        t0 = (tile // n_bt) * BT
        b0 = (tile % n_bt) * BB
        alpha = blk // D
        delta = blk % D
        it = t0 + tl.arange(0, BT)
        ib = b0 + tl.arange(0, BB)
        ik = tl.arange(0, BK)
        x_base = x_ptr + it[:, None].to(tl.int64) * sx_t + (alpha * C * D + delta) * sx_f
        w_base = w_ptr + blk.to(tl.int64) * sw_blk + ib[None, :] * sw_b
        acc = tl.zeros((BT, BB), dtype=tl.float32)
        for k0 in range(0, C, BK):
            kk = k0 + ik
            xm = (it[:, None] < T) & (kk[None, :] < C)
            x = tl.load(x_base + (kk[None, :] * D).to(tl.int64) * sx_f, mask=xm, other=0.0)
            wm = (kk[:, None] < C) & (ib[None, :] < B)
            w = tl.load(w_base + kk[:, None] * sw_c, mask=wm, other=0.0)       # Wᵀ: (BK, BB)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        ym = (it[:, None] < T) & (ib[None, :] < B)
        y_off = it[:, None].to(tl.int64) * sy_t + \
            ((alpha * B * D + delta) + ib[None, :] * D).to(tl.int64) * sy_f
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=ym)

    @triton.autotune(configs=_fwd3d_configs(), key=["A", "B", "C", "D"],
                     prune_configs_by={"early_config_prune": _prune({"BB": "B", "BK": "C"})})
    @triton.jit(do_not_specialize=["T"])
    def _ks_fwd_3d(x_ptr, w_ptr, y_ptr, T, A, B, C, D, sx_t, sy_t, sw_blk, sw_b, sw_c,
                   PRECISION: tl.constexpr, BT: tl.constexpr, BB: tl.constexpr,
                   BK: tl.constexpr, BD: tl.constexpr):
        """Batch-first with d > 1: a program owns BD consecutive δ of one α, so each token's
        loads are runs of BD contiguous elements (δ is the fastest axis in memory); the BD
        block products are one batched (3-D) dot."""
        g = tl.program_id(0)
        tile = tl.program_id(1)
        n_dt = tl.cdiv(D, BD)
        alpha = g // n_dt
        d0 = (g % n_dt) * BD
        n_bt = tl.cdiv(B, BB)
        t0 = (tile // n_bt) * BT
        b0 = (tile % n_bt) * BB
        it = t0 + tl.arange(0, BT)
        ib = b0 + tl.arange(0, BB)
        ik = tl.arange(0, BK)
        idd = d0 + tl.arange(0, BD)
        acc = tl.zeros((BD, BT, BB), dtype=tl.float32)
        for k0 in range(0, C, BK):
            kk = k0 + ik
            # x[t, α, γ, δ] as (BT, BK, BD), δ contiguous
            xp = x_ptr + it[:, None, None].to(tl.int64) * sx_t + \
                (alpha * C * D + kk[None, :, None] * D + idd[None, None, :]).to(tl.int64)
            xm = (it[:, None, None] < T) & (kk[None, :, None] < C) & (idd[None, None, :] < D)
            x = tl.load(xp, mask=xm, other=0.0)
            x = tl.permute(x, (2, 0, 1))                                     # (BD, BT, BK)
            # Wᵀ of block α·D + δ: (BD, BK, BB)
            wp = w_ptr + (alpha * D + idd[:, None, None]).to(tl.int64) * sw_blk + \
                kk[None, :, None] * sw_c + ib[None, None, :] * sw_b
            wm = (idd[:, None, None] < D) & (kk[None, :, None] < C) & (ib[None, None, :] < B)
            w = tl.load(wp, mask=wm, other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        out = tl.permute(acc, (1, 2, 0))                                     # (BT, BB, BD)
        yp = y_ptr + it[:, None, None].to(tl.int64) * sy_t + \
            (alpha * B * D + ib[None, :, None] * D + idd[None, None, :]).to(tl.int64)
        ym = (it[:, None, None] < T) & (ib[None, :, None] < B) & (idd[None, None, :] < D)
        tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=ym)

    @triton.autotune(configs=_dw_configs(), key=["A", "B", "C", "D", "SPLIT", "X_TOKEN_MAJOR"],
                     prune_configs_by={"early_config_prune": _prune({"BB": "B", "BC": "C"})},
                     reset_to_zero=[])
    @triton.jit(do_not_specialize=["T"])
    def _ks_dw(x_ptr, g_ptr, dw_ptr, T, A, B, C, D, SPLIT, sx_t, sx_f, sg_t, sg_f,
               X_TOKEN_MAJOR: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr,
               BB: tl.constexpr, BC: tl.constexpr):
        blk = tl.program_id(0)
        tile = tl.program_id(1)
        part = tl.program_id(2)
        n_bc = tl.cdiv(C, BC)
        b0 = (tile // n_bc) * BB
        c0 = (tile % n_bc) * BC
        alpha = blk // D
        delta = blk % D
        ib = b0 + tl.arange(0, BB)
        ic = c0 + tl.arange(0, BC)
        itl = tl.arange(0, BT)
        chunk = tl.cdiv(tl.cdiv(T, SPLIT), BT) * BT
        t_lo = part * chunk
        t_hi = tl.minimum(T, t_lo + chunk)
        acc = tl.zeros((BB, BC), dtype=tl.float32)
        for t0 in range(t_lo, t_hi, BT):
            it = t0 + itl
            gm = (ib[:, None] < B) & (it[None, :] < t_hi)
            g = tl.load(g_ptr + it[None, :].to(tl.int64) * sg_t +
                        ((alpha * B * D + delta) + ib[:, None] * D).to(tl.int64) * sg_f,
                        mask=gm, other=0.0)                                   # dYᵀ: (BB, BT)
            xm = (it[:, None] < t_hi) & (ic[None, :] < C)
            x = tl.load(x_ptr + it[:, None].to(tl.int64) * sx_t +
                        ((alpha * C * D + delta) + ic[None, :] * D).to(tl.int64) * sx_f,
                        mask=xm, other=0.0)                                   # X: (BT, BC)
            acc = tl.dot(g, x, acc, input_precision=PRECISION)
        dm = (ib[:, None] < B) & (ic[None, :] < C)
        off = (part * A * D + blk).to(tl.int64) * B * C + ib[:, None] * C + ic[None, :]
        tl.store(dw_ptr + off, acc, mask=dm)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision dots, as torch.bmm does (tf32 would cost ~3e-4)
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(x: torch.Tensor, batch_last: bool) -> tuple[int, int]:
    """(token stride, feature stride) of a 2-D tensor in either layout."""
    return (x.stride(1), x.stride(0)) if batch_last else (x.stride(0), x.stride(1))


def factor_forward(x: torch.Tensor, w: torch.Tensor, p: Pattern, batch_last: bool,
                   transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = K x for one factor (``transpose``: y = Kᵀ x, the input gradient), into ``out`` when
    given (any strides)."""
    a, b, c, d = p.a, p.b, p.c, p.d
    sw_blk, sw_b, sw_c = w.stride()
    if transpose:
        b, c, sw_b, sw_c = c, b, sw_c, sw_b
    t = x.shape[1] if batch_last else x.shape[0]
    shape = (a * b * d, t) if batch_last else (t, a * b * d)
    y = torch.empty(shape, device=x.device, dtype=x.dtype) if out is None else out
    assert tuple(y.shape) == shape, f"out has shape {tuple(y.shape)}, expected {shape}"
    sx_t, sx_f = _strides(x, batch_last)
    sy_t, sy_f = _strides(y, batch_last)

    if not batch_last and d >= MIN_D_3D and x.stride(1) == 1 and y.stride(1) == 1:
        def grid3(meta):
            return (a * triton.cdiv(d, meta["BD"]),
                    triton.cdiv(t, meta["BT"]) * triton.cdiv(b, meta["BB"]))

        _ks_fwd_3d[grid3](x, w, y, t, a, b, c, d, x.stride(0), y.stride(0), sw_blk, sw_b, sw_c,
                          PRECISION=_precision(x.dtype))
        return y

    def grid(meta):
        return (a * d, triton.cdiv(t, meta["BT"]) * triton.cdiv(b, meta["BB"]))

    _ks_fwd[grid](x, w, y, t, a, b, c, d, sx_t, sx_f, sy_t, sy_f, sw_blk, sw_b, sw_c,
                  X_TOKEN_MAJOR=not batch_last, PRECISION=_precision(x.dtype))
    return y


def factor_weight_grad(x: torch.Tensor, g: torch.Tensor, p: Pattern, batch_last: bool
                       ) -> torch.Tensor:
    """dW (a·d, b, c) = Σ_t dY_blkᵀ X_blk, in float32."""
    a, b, c, d = p.a, p.b, p.c, p.d
    t = x.shape[1] if batch_last else x.shape[0]
    tiles = triton.cdiv(b, 64) * triton.cdiv(c, 64)
    split = 1 if INTERPRET else max(1, min(triton.cdiv(t, 256), triton.cdiv(264, a * d * tiles)))
    partial = torch.empty((split, a * d, b, c), device=x.device, dtype=torch.float32)
    sx_t, sx_f = _strides(x, batch_last)
    sg_t, sg_f = _strides(g, batch_last)

    def grid(meta):
        return (a * d, triton.cdiv(b, meta["BB"]) * triton.cdiv(c, meta["BC"]), split)

    _ks_dw[grid](x, g, partial, t, a, b, c, d, split, sx_t, sx_f, sg_t, sg_f,
                 X_TOKEN_MAJOR=not batch_last, PRECISION=_precision(x.dtype))
    return partial.sum(0) if split > 1 else partial[0]


class _KSFactor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, pattern, batch_last):
        ctx.save_for_backward(x, w)
        ctx.pattern, ctx.batch_last = pattern, batch_last
        return factor_forward(x, w, pattern, batch_last)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = factor_forward(grad, w, ctx.pattern, ctx.batch_last, transpose=True)
        if ctx.needs_input_grad[1]:
            dw = factor_weight_grad(x, grad, ctx.pattern, ctx.batch_last).to(w.dtype)
        return dx, dw, None, None


def ks_chain_triton(x: torch.Tensor, factors, patterns, batch_last: bool = False
                    ) -> torch.Tensor:
    """The chain, one kernel launch per factor (differentiable through _KSFactor)."""
    x = x.contiguous()
    for w, p in zip(factors, patterns):
        x = _KSFactor.apply(x, w.contiguous(), p, batch_last)
    return x
