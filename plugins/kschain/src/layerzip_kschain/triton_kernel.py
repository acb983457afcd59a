"""Kronecker-sparse factor products in Triton, forward and backward, both layouts.

One factor (a, b, c, d) with blocks W (a·d, b, c): y[t, α·b·d + β·d + δ] = Σ_γ W[α·d+δ, β, γ] ·
x[t, α·c·d + γ·d + δ]. A program owns one block (α, δ), a tile of tokens and of outputs, and
loops over c with tensor-core dots (fp32 accumulation). Inputs and outputs are addressed through
(token, feature) strides and read in place — no permutation kernels:

- batch-first (T × n), 16-bit, d a power of two: ``_ks_fwd_split``, a program owns g
  consecutive δ of one α (g = d up to 8; beyond, g ∈ {2, 4, 8} is tuned), loads the
  (tokens × c·g) tile (the whole contiguous tile when g = d, runs of g elements otherwise)
  and splits it in registers into its g slices, one 2-D dot each (H100, bf16, d ∈ {4, 8}:
  median 2.20× over bmm under CUDA graphs, the 3-D kernel's 1.06×);
- other batch-first factors with d ≥ 4: ``_ks_fwd_3d``, a program owns BD consecutive δ so each
  token's loads are runs of BD contiguous elements, and its BD block products are one batched
  (3-D) dot;
- the remaining batch-first ones (d = 1, 3; fp32 d = 2): ``_ks_fwd``, tiles (BT tokens × BB
  outputs); the block index is the fastest grid axis, so programs of neighbouring δ, which share
  cache lines, run together;
- batch-last (n × T): ``_ks_fwd_bl``; every feature is a row of contiguous tokens, so a block is
  a plain GEMM on rows d apart, computed with tokens as the accumulator's fast axis.

Sizes below 16 (down to 2×2 blocks) are padded with masks: correct, and slower per useful FLOP.

Backward: dX is the forward kernel on the transposed pattern (a, c, b, d) reading W through
swapped strides; dW[blk] = Σ_t dY_blkᵀ X_blk is a second kernel that splits the token range over
programs (partial sums in fp32, added by one torch.sum) so that few large blocks still fill the
GPU. Autotuning is keyed on the pattern and layout, never on T. T is not specialized where tokens
are rows (batch-first); where they are the contiguous axis (batch-last) it is — only on
Triton's classes (T = 1, T divisible by 16, other), which the token masks need to vectorize — so
a new batch size compiles at most those variants, not one per size. Launches go through
:class:`layerzip.LaunchCache`, which skips Triton's per-call dispatch after the first call.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from layerzip import LaunchCache, cdiv, triton_interpreted

from .patterns import Pattern

INTERPRET = triton_interpreted()
# correctness runs on a GPU (LAYERZIP_TRITON_QUICK=1): two tile shapes per kernel, not a full
# autotune — compiling every config for every tested pattern takes many minutes on a cold cache
QUICK = os.environ.get("LAYERZIP_TRITON_QUICK") == "1"
# other batch-first factors with d ≥ this use the 3-D kernel (runs of δ loaded contiguously)
MIN_D_3D = 4
# batch-first 16-bit factors whose d is a power of two load (BT, BK·g) tiles of g consecutive
# δ (g = d up to 8; beyond, g ∈ SPLIT_D is tuned) and split them in registers, d/g programs per
# α (fp32 tiles are twice the size: d ≥ 4 keeps the 3-D kernel, d = 2 the 2-D one)
SPLIT_D = (2, 4, 8)
SPLIT_DTYPES = (torch.bfloat16, torch.float16)


def split_group(d: int) -> int:
    """The largest δ-per-program count of the split kernel for a factor with this d (what the
    interpreter and quick runs use); 0 where the kernel does not apply (d not a power of two
    ≥ 2, or SPLIT_D emptied to compare kernels)."""
    if d < 2 or d & (d - 1):
        return 0
    g = min(d, max(SPLIT_D, default=0))
    return g if g in SPLIT_D else 0


def _p2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _tile_configs(names: str, rows) -> list:
    """Autotune configs from rows (tile sizes in the order of ``names``, num_warps, num_stages):
    under the interpreter one small config (tiles of 16, batch tile BD 2), with
    LAYERZIP_TRITON_QUICK=1 the first two rows."""
    names = names.split()
    if INTERPRET:
        return [triton.Config({n: 2 if n == "BD" else 16 for n in names}, num_warps=1)]
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1])
            for row in rows[:2 if QUICK else None]]


def _fwd_configs():
    return _tile_configs("BT BB BK", [
        (128, 64, 64, 4, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4), (128, 32, 32, 4, 4),
        (64, 128, 64, 8, 3), (256, 64, 32, 8, 3), (128, 16, 16, 4, 2), (64, 32, 16, 4, 3)])


def _split_configs():
    """Tile rows × DG (δ per program) ∈ SPLIT_D; _prune_split keeps the DG a pattern allows."""
    return [triton.Config({**c.kwargs, "DG": g}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in _split_tiles() for g in SPLIT_D]


def _split_tiles():
    return _tile_configs("BT BB BK", [
        (64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 32, 64, 4, 3),
        (32, 64, 64, 4, 3), (128, 32, 32, 8, 3), (64, 64, 64, 8, 3), (32, 32, 32, 4, 4)])


def _fwd3d_configs():
    # BD ≥ 16 makes each token's loads 32-byte runs (whole sectors) when d is large
    return _tile_configs("BT BB BK BD", [
        (64, 64, 32, 4, 4, 3), (32, 64, 64, 8, 4, 3), (64, 32, 32, 8, 4, 3),
        (128, 64, 32, 2, 8, 3), (32, 128, 32, 4, 8, 3), (16, 16, 16, 16, 4, 2),
        (32, 32, 32, 16, 8, 3), (16, 64, 32, 16, 8, 3), (16, 32, 16, 32, 8, 2),
        (32, 16, 32, 32, 8, 2)])


def _fwd_bl_configs():
    return _tile_configs("BB BT BK", [
        (64, 128, 64, 4, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4), (32, 128, 32, 4, 4),
        (128, 64, 64, 8, 3), (64, 256, 32, 8, 3), (16, 128, 16, 4, 3), (32, 64, 32, 4, 3),
        (128, 256, 64, 8, 3)])


def _dw_configs():
    return _tile_configs("BT BB BC", [
        (64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 32, 32, 4, 4),
        (128, 16, 16, 4, 2)])


def _prune(sizes, batch=None):
    """Drop configs whose tiles exceed the (padded) block sizes: they only add masked work.
    Dot dimensions are padded to ≥ 16 (tensor cores); ``batch`` maps a batch tile (not a dot
    dimension) to its size, capped at the next power of two."""

    def prune(configs, named_args, **kwargs):
        caps = {k: _p2(named_args[v]) for k, v in sizes.items()}
        caps.update({k: 1 << max(0, (named_args[v] - 1).bit_length())
                     for k, v in (batch or {}).items()})
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


# shared memory per block on the H100 (sm_90); configs whose pipelined tiles exceed it fail
SMEM_LIMIT = 227 * 1024


def _prune_split(configs, named_args, **kwargs):
    """Keep the δ-per-program counts DG the pattern allows — all of d when d ≤ 8 (the whole
    tile is contiguous), any of SPLIT_D beyond (tuned: more δ per program means longer runs
    in memory but more accumulators, hence smaller tiles); one, split_group(d), under the
    interpreter and LAYERZIP_TRITON_QUICK. Then _prune, then drop configs whose pipelined x
    and W tiles (DG of each per stage) cannot fit in shared memory (they would fail to launch);
    if none fits, the smallest, with two stages and its largest tile halved until it does — so
    the autotuner always has one to run."""
    d = kwargs.get("D", named_args.get("D"))
    allowed = {d} if d <= max(SPLIT_D) else set(SPLIT_D)
    if INTERPRET or QUICK:
        allowed = {split_group(d)}
    configs = [cfg for cfg in configs if cfg.kwargs["DG"] in allowed]
    configs = _prune({"BB": "B", "BK": "C"})(configs, named_args, **kwargs)
    size = named_args["x_ptr"].element_size()

    def smem(k, stages):
        return stages * k["DG"] * k["BK"] * (k["BT"] + k["BB"]) * size

    fit = [cfg for cfg in configs if smem(cfg.kwargs, cfg.num_stages) <= SMEM_LIMIT]
    if fit:
        return fit
    small = min(configs, key=lambda cfg: smem(cfg.kwargs, 1))
    k = dict(small.kwargs)
    while smem(k, 2) > SMEM_LIMIT and max(k["BT"], k["BB"], k["BK"]) > 16:
        big = max(("BT", "BB", "BK"), key=lambda n: k[n])
        k[big] //= 2
    return [triton.Config(k, num_warps=small.num_warps, num_stages=2)]


if triton is not None:

    @triton.autotune(configs=_fwd_configs(), key=["A", "B", "C", "D"],
                     prune_configs_by={"early_config_prune": _prune({"BB": "B", "BK": "C"})})
    @triton.jit(do_not_specialize=["T"])
    def _ks_fwd(x_ptr, w_ptr, y_ptr, T, A, B, C, D, sx_t, sx_f, sy_t, sy_f, sw_blk, sw_b, sw_c,
                PRECISION: tl.constexpr, BT: tl.constexpr,
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

    @triton.autotune(configs=_fwd_bl_configs(), key=["A", "B", "C", "D"],
                     prune_configs_by={"early_config_prune": _prune({"BB": "B", "BK": "C"})})
    @triton.jit  # T specialized (== 1, % 16): the token axis is contiguous here
    def _ks_fwd_bl(x_ptr, w_ptr, y_ptr, T, A, B, C, D, sx_t, sx_f, sy_t, sy_f, sw_blk, sw_b,
                   sw_c, PRECISION: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr):
        """Batch-last: every feature is a row of T contiguous tokens, so block (α, δ) is the
        plain GEMM Y_blk (b × T) = W_blk (b × c) · X_blk (c × T) on rows d apart — each tile a
        run of BT contiguous tokens per row, whatever d. Computed in that orientation (tokens
        the fast axis of the accumulator), so loads and stores are coalesced without layout
        conversions. β-tiles are the fastest grid axis: programs re-reading one X tile run
        together."""
        tile = tl.program_id(0)
        blk = tl.program_id(1)
        n_bb = tl.cdiv(B, BB)
        b0 = (tile % n_bb) * BB
        t0 = (tile // n_bb) * BT
        alpha = blk // D
        delta = blk % D
        ib = b0 + tl.arange(0, BB)
        it = t0 + tl.arange(0, BT)
        ik = tl.arange(0, BK)
        w_base = w_ptr + blk.to(tl.int64) * sw_blk + ib[:, None] * sw_b
        x_base = x_ptr + (alpha * C * D + delta).to(tl.int64) * sx_f + \
            it[None, :].to(tl.int64) * sx_t
        acc = tl.zeros((BB, BT), dtype=tl.float32)
        for k0 in range(0, C, BK):
            kk = k0 + ik
            w = tl.load(w_base + kk[None, :] * sw_c,
                        mask=(ib[:, None] < B) & (kk[None, :] < C), other=0.0)     # (BB, BK)
            x = tl.load(x_base + (kk[:, None] * D).to(tl.int64) * sx_f,
                        mask=(kk[:, None] < C) & (it[None, :] < T), other=0.0)     # (BK, BT)
            acc = tl.dot(w, x, acc, input_precision=PRECISION)
        y_off = ((alpha * B * D + delta) + ib[:, None] * D).to(tl.int64) * sy_f + \
            it[None, :].to(tl.int64) * sy_t
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty),
                 mask=(ib[:, None] < B) & (it[None, :] < T))

    @triton.jit
    def _block_dot(x, acc, w_tile_ptr, w_mask, PRECISION: tl.constexpr):
        """acc + x · Wᵀ, the block's (BK, BB) tile loaded through ``w_tile_ptr``."""
        return tl.dot(x, tl.load(w_tile_ptr, mask=w_mask, other=0.0), acc,
                      input_precision=PRECISION)

    @triton.autotune(configs=_split_configs(), key=["A", "B", "C", "D"],
                     prune_configs_by={"early_config_prune": _prune_split})
    @triton.jit(do_not_specialize=["T"])
    def _ks_fwd_split(x_ptr, w_ptr, y_ptr, T, A, B, C, sx_t, sy_t, sw_blk, sw_b, sw_c,
                      D: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr,
                      BB: tl.constexpr, BK: tl.constexpr, DG: tl.constexpr):
        """Batch-first, d a power of two: a program owns DG consecutive δ of one α (DG = d up
        to 8, tuned among 2, 4, 8 beyond; d/DG programs per α). It loads x as one (BT, BK·DG)
        tile — runs of DG contiguous elements per γ, the whole tile contiguous when DG = d;
        coalesced, vectorized, pipelined, unlike the stride-d loads of one δ — and splits it
        in registers into the DG (BT, BK) slices (tl.split halves the innermost axis, δ's
        lowest bit first), each a 2-D tensor-core dot with its own block; the DG accumulators
        are joined back into (BT, BB·DG) and stored the same way."""
        groups = D // DG
        alpha = tl.program_id(0) // groups
        dg0 = (tl.program_id(0) % groups) * DG   # first δ of this program
        tile = tl.program_id(1)
        n_bb = tl.cdiv(B, BB)
        t0 = (tile // n_bb) * BT
        b0 = (tile % n_bb) * BB
        it = t0 + tl.arange(0, BT)
        ib = b0 + tl.arange(0, BB)
        ik = tl.arange(0, BK)
        ikd = tl.arange(0, BK * DG)
        kd = ikd // DG                            # γ offset within the tile, then δ offset
        blk = alpha * D + dg0
        x_base = x_ptr + it[:, None].to(tl.int64) * sx_t + (
            alpha * C * D + dg0 + (kd * D + ikd % DG)[None, :])
        acc0 = tl.zeros((BT, BB), dtype=tl.float32)
        acc1 = tl.zeros((BT, BB), dtype=tl.float32)
        if DG >= 4:
            acc2 = tl.zeros((BT, BB), dtype=tl.float32)
            acc3 = tl.zeros((BT, BB), dtype=tl.float32)
        if DG == 8:
            acc4 = tl.zeros((BT, BB), dtype=tl.float32)
            acc5 = tl.zeros((BT, BB), dtype=tl.float32)
            acc6 = tl.zeros((BT, BB), dtype=tl.float32)
            acc7 = tl.zeros((BT, BB), dtype=tl.float32)
        w_base = w_ptr + blk.to(tl.int64) * sw_blk + ib[None, :] * sw_b
        for k0 in range(0, C, BK):
            kk = k0 + ik
            wp = w_base + kk[:, None] * sw_c         # Wᵀ tile of block α·d; of α·d + i: + i·sw_blk
            wm = (kk[:, None] < C) & (ib[None, :] < B)
            xm = (it[:, None] < T) & (k0 + kd[None, :] < C)
            x = tl.load(x_base + k0 * D, mask=xm, other=0.0)       # (BT, BK·DG), δ fastest
            if DG == 2:
                x0, x1 = tl.split(tl.reshape(x, (BT, BK, 2)))
                acc0 = _block_dot(x0, acc0, wp, wm, PRECISION)
                acc1 = _block_dot(x1, acc1, wp + sw_blk, wm, PRECISION)
            elif DG == 4:
                xe, xo = tl.split(tl.reshape(x, (BT, BK, 2, 2)))      # δ = 2·δ1 + δ0
                x0, x2 = tl.split(xe)
                x1, x3 = tl.split(xo)
                acc0 = _block_dot(x0, acc0, wp, wm, PRECISION)
                acc1 = _block_dot(x1, acc1, wp + sw_blk, wm, PRECISION)
                acc2 = _block_dot(x2, acc2, wp + 2 * sw_blk, wm, PRECISION)
                acc3 = _block_dot(x3, acc3, wp + 3 * sw_blk, wm, PRECISION)
            else:
                xe, xo = tl.split(tl.reshape(x, (BT, BK, 2, 2, 2)))   # δ = 4·δ2 + 2·δ1 + δ0
                xee, xeo = tl.split(xe)
                xoe, xoo = tl.split(xo)
                x0, x4 = tl.split(xee)
                x2, x6 = tl.split(xeo)
                x1, x5 = tl.split(xoe)
                x3, x7 = tl.split(xoo)
                acc0 = _block_dot(x0, acc0, wp, wm, PRECISION)
                acc1 = _block_dot(x1, acc1, wp + sw_blk, wm, PRECISION)
                acc2 = _block_dot(x2, acc2, wp + 2 * sw_blk, wm, PRECISION)
                acc3 = _block_dot(x3, acc3, wp + 3 * sw_blk, wm, PRECISION)
                acc4 = _block_dot(x4, acc4, wp + 4 * sw_blk, wm, PRECISION)
                acc5 = _block_dot(x5, acc5, wp + 5 * sw_blk, wm, PRECISION)
                acc6 = _block_dot(x6, acc6, wp + 6 * sw_blk, wm, PRECISION)
                acc7 = _block_dot(x7, acc7, wp + 7 * sw_blk, wm, PRECISION)
        # join innermost-first, mirroring the splits: the last axis becomes δ's lowest bit
        if DG == 2:
            out = tl.join(acc0, acc1)
        elif DG == 4:
            out = tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3))
        else:
            out = tl.join(tl.join(tl.join(acc0, acc4), tl.join(acc2, acc6)),
                          tl.join(tl.join(acc1, acc5), tl.join(acc3, acc7)))
        out = tl.reshape(out, (BT, BB * DG))                          # (β, δ) → β·DG + δ
        ibd = tl.arange(0, BB * DG)
        bb = b0 + ibd // DG
        y_off = it[:, None].to(tl.int64) * sy_t + (
            alpha * B * D + dg0 + (bb * D + ibd % DG)[None, :])
        tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty),
                 mask=(it[:, None] < T) & (bb[None, :] < B))

    @triton.autotune(configs=_fwd3d_configs(), key=["A", "B", "C", "D"],
                     prune_configs_by={"early_config_prune": _prune({"BB": "B", "BK": "C"},
                                                                 batch={"BD": "D"})})
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
    @triton.jit  # T specialized: contiguous token axis in batch-last inputs
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


if triton is not None:
    # relaunch the chosen binary without Triton's per-call dispatch (tens of µs per launch)
    _FWD, _FWD_BL, _FWD_3D = LaunchCache(_ks_fwd), LaunchCache(_ks_fwd_bl), LaunchCache(_ks_fwd_3d)
    _FWD_SPLIT = LaunchCache(_ks_fwd_split)
    _DW = LaunchCache(_ks_dw)


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

    contiguous = not batch_last and x.stride(1) == 1 and y.stride(1) == 1
    # the interpreter runs it in fp32 too: CI checks the split/join indexing on the CPU
    if contiguous and split_group(d) and (x.dtype in SPLIT_DTYPES or INTERPRET):
        def grid_split(meta):
            return (a * (d // meta["DG"]),
                    cdiv(t, meta["BT"]) * cdiv(b, meta["BB"]))

        _FWD_SPLIT(grid_split, x, w, y, t, a, b, c, x.stride(0), y.stride(0), sw_blk, sw_b, sw_c,
                   D=d, PRECISION=_precision(x.dtype))
        return y

    if contiguous and d >= MIN_D_3D:
        def grid3(meta):
            return (a * cdiv(d, meta["BD"]),
                    cdiv(t, meta["BT"]) * cdiv(b, meta["BB"]))

        _FWD_3D(grid3, x, w, y, t, a, b, c, d, x.stride(0), y.stride(0), sw_blk, sw_b, sw_c,
                          PRECISION=_precision(x.dtype))
        return y

    if batch_last:
        def grid_bl(meta):
            return (cdiv(t, meta["BT"]) * cdiv(b, meta["BB"]), a * d)

        _FWD_BL(grid_bl, x, w, y, t, a, b, c, d, sx_t, sx_f, sy_t, sy_f, sw_blk, sw_b, sw_c,
                PRECISION=_precision(x.dtype))
        return y

    def grid(meta):
        return (a * d, cdiv(t, meta["BT"]) * cdiv(b, meta["BB"]))

    _FWD(grid, x, w, y, t, a, b, c, d, sx_t, sx_f, sy_t, sy_f, sw_blk, sw_b, sw_c,
         PRECISION=_precision(x.dtype))
    return y


def factor_weight_grad(x: torch.Tensor, g: torch.Tensor, p: Pattern, batch_last: bool
                       ) -> torch.Tensor:
    """dW (a·d, b, c) = Σ_t dY_blkᵀ X_blk, in float32."""
    a, b, c, d = p.a, p.b, p.c, p.d
    t = x.shape[1] if batch_last else x.shape[0]
    tiles = cdiv(b, 64) * cdiv(c, 64)
    split = 1 if INTERPRET else max(1, min(cdiv(t, 256), cdiv(264, a * d * tiles)))
    partial = torch.empty((split, a * d, b, c), device=x.device, dtype=torch.float32)
    sx_t, sx_f = _strides(x, batch_last)
    sg_t, sg_f = _strides(g, batch_last)

    def grid(meta):
        return (a * d, cdiv(b, meta["BB"]) * cdiv(c, meta["BC"]), split)

    _DW(grid, x, g, partial, t, a, b, c, d, split, sx_t, sx_f, sg_t, sg_f,
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
    """The chain, one kernel launch per factor (differentiable through _KSFactor; while
    torch.compile traces, through the custom ops of ops.py, which it can put in its graph)."""
    if torch.compiler.is_compiling():
        from .ops import factor

        for w, p in zip(factors, patterns):
            x = factor(x, w, p.as_list(), batch_last)
        return x
    x = x.contiguous()
    track = torch.is_grad_enabled()
    for w, p in zip(factors, patterns):
        w = w.contiguous()
        if track and (x.requires_grad or w.requires_grad):
            x = _KSFactor.apply(x, w, p, batch_last)
        else:  # no graph to record: skip autograd.Function's per-call cost
            x = factor_forward(x, w, p, batch_last)
    return x
