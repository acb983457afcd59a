"""Kronecker layer in Triton: y_t = Σₖ Aₖ X_t Bₖᵀ for every token t, and its gradients.

Forward (:func:`kron_fused`). A persistent program walks tiles of TB consecutive tokens. It
loads the tile as one (n1, TB·n2) matrix — row κ holds X_t[κ, :] for each token t of the tile,
so every run of n2 elements is contiguous in memory — and needs no transpose anywhere:

    U = Aₖ · X_tile              (m1, TB·n2)   U[i, (t, l)] = (Aₖ X_t)[i, l]
    U viewed as (m1·TB, n2)                    (a reshape: row (i, t), column l)
    Y_tile += U · Bₖᵀ            (m1·TB, m2)   Y[(i, t), j] = (Aₖ X_t Bₖᵀ)[i, j]

and stores row (i, t) as the contiguous run Y_t[i, :]. Both products are plain 2-D
tensor-core dots of TB·64-wide tiles (the per-token 64 × 64 × 64 dots of the first version
could not be pipelined), the x tile loads are pipelined across the persistent loop, and x is
read and y written exactly once. Factor sizes are padded to powers of two ≥ 16 with masks.
When no gradient is needed a residual of whole blocks (``residual_structure: blocks``) is
applied in place to the fresh y by :func:`add_block_residual_` here; with gradients, and for
single entries, the reference's torch code adds it.

Backward (:func:`kron_fused_autograd`): dX = Σₖ (Aₖᵀ ⊗ Bₖᵀ) dY is the forward kernel with
transposed factors. dAₖ and dBₖ come from one more kernel that reads each X and dY tile once
per term and reduces in registers, with the same no-transpose views:

    dBₖ += dYᵀ · U               dY viewed as (m1·TB, m2) rows (i, t), U as above
    G    = dY · Bₖ               (m1·TB, n2), viewed as (m1, TB·n2)
    dAₖ += G · X_tileᵀ

Each program writes its fp32 partial sums; they are added on the host (no atomics, so the
gradients are deterministic).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from layerzip import LaunchCache, cdiv, triton_interpreted

INTERPRET = triton_interpreted()
# correctness runs on a GPU (LAYERZIP_TRITON_QUICK=1): two configs per kernel, not a full
# autotune (compiling every config for every tested shape takes minutes on a cold cache)
QUICK = os.environ.get("LAYERZIP_TRITON_QUICK") == "1"
# token tiles are chosen so that the dots are this wide (TB · max(n2, m2) columns): on the H100
# 64- and 128-wide tiles ran within 3% of each other and wider ones lost (spills, fewer
# programs per SM; benchmarks/results/kronecker_probe.md)
TILE_WIDTHS = (64, 128)
# fp32 accumulator registers a thread may hold (U and Y tiles) before a config is dropped
MAX_ACC_PER_THREAD = 128
SMEM_LIMIT = 227 * 1024  # H100 shared memory per block


def _p2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _configs():
    if INTERPRET:  # one small tile of 2 tokens: exercises the token tails and the reshapes
        return [triton.Config({"TB": 2, "OCC": 1}, num_warps=1)]
    # OCC: persistent programs per SM. Three pipeline stages won everywhere in the probe (two
    # were up to 2× slower); a non-persistent grid lost up to 2.5× for the gradient kernel.
    return [triton.Config({"TB": tb, "OCC": occ}, num_warps=w, num_stages=3)
            for tb in (1, 2, 4, 8, 16) for w in (4, 8) for occ in (2, 4)]


def _prune(configs, named_args, **kwargs):
    """Keep token tiles that make TILE_WIDTHS-wide dots and fit in registers and shared memory
    (x and y tiles per stage, plus room for the factors); if none does, the smallest tile with
    the most warps (so the autotuner always has one to run)."""
    if INTERPRET:
        return configs
    bm1, bn1, bm2, bn2 = (kwargs.get(n, named_args.get(n)) for n in ("BM1", "BN1", "BM2", "BN2"))
    size = named_args["x_ptr"].element_size()
    width = max(bn2, bm2)

    def fits(c):
        tb = c.kwargs["TB"]
        acc = tb * bm1 * (bn2 + bm2) // (c.num_warps * 32)
        smem = (c.num_stages * (bn1 * tb * bn2 + tb * bm1 * bm2)
                + 4 * (bm1 * bn1 + bm2 * bn2)) * size
        return tb * width in TILE_WIDTHS and acc <= MAX_ACC_PER_THREAD and smem <= SMEM_LIMIT

    kept = [c for c in configs if fits(c)]
    if not kept:
        kept = [min(configs, key=lambda c: (c.kwargs["TB"], -c.num_warps))]
    return kept[:2] if QUICK else kept


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(x: torch.Tensor, tiles: int, occupancy: int) -> int:
    """Persistent grid: at most `occupancy` programs per SM (all tiles on the CPU)."""
    if x.device.type != "cuda":
        return tiles
    return max(1, min(tiles, _sm_count(x.device.index or 0) * occupancy))


if triton is not None:

    @triton.jit
    def _tile_offsets(N1, N2, M1, M2, BM1: tl.constexpr, BN1: tl.constexpr,
                      BM2: tl.constexpr, BN2: tl.constexpr, TB: tl.constexpr):
        """Offsets within a token tile: x as (n1, TB·n2) [row κ, column (t, l)] and y as
        (m1·TB, m2) [row (i, t), column j], each with its in-range mask and token index."""
        xr = tl.arange(0, BN1)
        xc = tl.arange(0, TB * BN2)
        xt = xc // BN2
        xl = xc % BN2
        x_off = xt[None, :] * (N1 * N2) + xr[:, None] * N2 + xl[None, :]
        x_in = (xr[:, None] < N1) & (xl[None, :] < N2)
        yr = tl.arange(0, BM1 * TB)
        yi = yr // TB
        yt = yr % TB
        yj = tl.arange(0, BM2)
        y_off = yt[:, None] * (M1 * M2) + yi[:, None] * M2 + yj[None, :]
        y_in = (yi[:, None] < M1) & (yj[None, :] < M2)
        return x_off, x_in, xt, y_off, y_in, yt

    @triton.jit
    def _load_factor(ptr, k, rows, cols, BR: tl.constexpr, BC: tl.constexpr,
                     TRANSPOSE: tl.constexpr):
        """Factor k of a stacked (R, rows, cols) tensor, padded to (BR, BC), or its transpose."""
        r = tl.arange(0, BR)
        c = tl.arange(0, BC)
        base = ptr + k * rows * cols
        if TRANSPOSE:
            return tl.load(base + c[None, :] * cols + r[:, None],
                           mask=(c[None, :] < rows) & (r[:, None] < cols), other=0.0)
        return tl.load(base + r[:, None] * cols + c[None, :],
                       mask=(r[:, None] < rows) & (c[None, :] < cols), other=0.0)

    @triton.autotune(configs=_configs(),
                     key=["T_BUCKET", "M1", "N1", "M2", "N2", "R", "ACCUMULATE"],
                     prune_configs_by={"early_config_prune": _prune}, restore_value=["y_ptr"])
    @triton.jit
    def _kron_fwd(x_ptr, a_ptr, b_ptr, y_ptr, T, T_BUCKET, M1, N1, M2, N2,
                  R: tl.constexpr, BM1: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr,
                  BN2: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
                  TB: tl.constexpr, OCC: tl.constexpr):
        """y = Σₖ (Aₖ ⊗ Bₖ) x per token, or y += it with ACCUMULATE (y then holds what was
        computed before, e.g. a column residual: one read of y instead of a second pass)."""
        x_off, x_in, xt, y_off, y_in, yt = _tile_offsets(N1, N2, M1, M2, BM1, BN1, BM2, BN2, TB)
        a0 = _load_factor(a_ptr, 0, M1, N1, BM1, BN1, False)
        bt0 = _load_factor(b_ptr, 0, M2, N2, BN2, BM2, True)
        for tile in tl.range(tl.program_id(0), tl.cdiv(T, TB), tl.num_programs(0)):
            t0 = tl.cast(tile, tl.int64) * TB
            x = tl.load(x_ptr + t0 * N1 * N2 + x_off, mask=x_in & (t0 + xt[None, :] < T),
                        other=0.0)
            if ACCUMULATE:
                acc = tl.load(y_ptr + t0 * M1 * M2 + y_off, mask=y_in & (t0 + yt[:, None] < T),
                              other=0.0).to(tl.float32)
            else:
                acc = tl.zeros((BM1 * TB, BM2), dtype=tl.float32)
            for k in tl.static_range(R):
                if k == 0:  # the first term's factors stay in registers for every tile
                    a, bt = a0, bt0
                else:
                    a = _load_factor(a_ptr, k, M1, N1, BM1, BN1, False)
                    bt = _load_factor(b_ptr, k, M2, N2, BN2, BM2, True)
                u = tl.dot(a, x, input_precision=PRECISION)                    # (BM1, TB·BN2)
                u = tl.reshape(u.to(x.dtype), (BM1 * TB, BN2))                 # rows (i, t)
                acc = tl.dot(u, bt, acc, input_precision=PRECISION)           # (BM1·TB, BM2)
            tl.store(y_ptr + t0 * M1 * M2 + y_off, acc.to(y_ptr.dtype.element_ty),
                     mask=y_in & (t0 + yt[:, None] < T))

    @triton.autotune(configs=_configs(), key=["T_BUCKET", "M1", "N1", "M2", "N2", "R"],
                     prune_configs_by={"early_config_prune": _prune},
                     reset_to_zero=["parts_ptr"])
    @triton.jit
    def _kron_grad(x_ptr, dy_ptr, a_ptr, b_ptr, parts_ptr, T, T_BUCKET, M1, N1, M2, N2,
                   R: tl.constexpr, BM1: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr,
                   BN2: tl.constexpr, PRECISION: tl.constexpr, TB: tl.constexpr,
                   OCC: tl.constexpr):
        """Program (p, k): the partial sums of dAₖ and dBₖ over the tiles p owns, stored in row
        (p, k) of parts."""
        pid = tl.program_id(0)
        k = tl.program_id(1)
        x_off, x_in, xt, y_off, y_in, yt = _tile_offsets(N1, N2, M1, M2, BM1, BN1, BM2, BN2, TB)
        a = _load_factor(a_ptr, k, M1, N1, BM1, BN1, False)
        b = _load_factor(b_ptr, k, M2, N2, BM2, BN2, False)
        da = tl.zeros((BM1, BN1), dtype=tl.float32)
        db = tl.zeros((BM2, BN2), dtype=tl.float32)
        for tile in tl.range(pid, tl.cdiv(T, TB), tl.num_programs(0)):
            t0 = tl.cast(tile, tl.int64) * TB
            x = tl.load(x_ptr + t0 * N1 * N2 + x_off, mask=x_in & (t0 + xt[None, :] < T),
                        other=0.0)
            dy = tl.load(dy_ptr + t0 * M1 * M2 + y_off, mask=y_in & (t0 + yt[:, None] < T),
                         other=0.0)
            u = tl.dot(a, x, input_precision=PRECISION)                        # (BM1, TB·BN2)
            u = tl.reshape(u.to(x.dtype), (BM1 * TB, BN2))
            db = tl.dot(tl.trans(dy), u, db, input_precision=PRECISION)       # (BM2, BN2)
            g = tl.dot(dy, b, input_precision=PRECISION)                       # (BM1·TB, BN2)
            g = tl.reshape(g.to(x.dtype), (BM1, TB * BN2))
            da = tl.dot(g, tl.trans(x), da, input_precision=PRECISION)        # (BM1, BN1)
        row = parts_ptr + tl.cast(pid * R + k, tl.int64) * (BM1 * BN1 + BM2 * BN2)
        ra, ca = tl.arange(0, BM1), tl.arange(0, BN1)
        tl.store(row + ra[:, None] * BN1 + ca[None, :], da)
        rb, cb = tl.arange(0, BM2), tl.arange(0, BN2)
        tl.store(row + BM1 * BN1 + rb[:, None] * BN2 + cb[None, :], db)

    def _block_configs():
        if INTERPRET:
            return [triton.Config({"BT": 16}, num_warps=1)]
        return [triton.Config({"BT": bt}, num_warps=w, num_stages=3)
                for bt, w in ((128, 4), (64, 4), (128, 8), (256, 8))][:2 if QUICK else None]

    # y is updated in place: the autotuner must restore it after each timed run
    @triton.autotune(configs=_block_configs(), key=["T_BUCKET", "M2", "N2"],
                     restore_value=["y_ptr"])
    @triton.jit
    def _kron_block_residual(x_ptr, s_ptr, idx_ptr, rowptr_ptr, y_ptr, T, T_BUCKET, N1, N2, M2,
                             BM2: tl.constexpr, BN2: tl.constexpr, PRECISION: tl.constexpr,
                             BT: tl.constexpr):
        """y[t, p·m2 : (p+1)·m2] += Σ_b x[t, q_b·n2 : (q_b+1)·n2] · S_bᵀ over the blocks b of
        block row p (block index p·n1 + q, sorted; rowptr from the host). Program (tile, p)
        owns its y block, so the read-modify-write needs no atomics."""
        t0 = tl.cast(tl.program_id(0), tl.int64) * BT
        p = tl.program_id(1)
        start = tl.load(rowptr_ptr + p)
        end = tl.load(rowptr_ptr + p + 1)
        if start < end:
            rt = tl.arange(0, BT)
            cl = tl.arange(0, BN2)
            cj = tl.arange(0, BM2)
            tok = (t0 + rt) < T
            acc = tl.zeros((BT, BM2), dtype=tl.float32)
            for blk in range(start, end):
                q = tl.load(idx_ptr + blk) % N1
                xq = tl.load(x_ptr + (t0 + rt[:, None]) * (N1 * N2) + q * N2 + cl[None, :],
                             mask=tok[:, None] & (cl[None, :] < N2), other=0.0)
                st = tl.load(s_ptr + tl.cast(blk, tl.int64) * M2 * N2 + cj[None, :] * N2
                             + cl[:, None], mask=(cl[:, None] < N2) & (cj[None, :] < M2),
                             other=0.0)                                         # S_bᵀ: (n2, m2)
                acc = tl.dot(xq, st.to(xq.dtype), acc, input_precision=PRECISION)
            yp = y_ptr + (t0 + rt[:, None]) * (tl.num_programs(1) * M2) + p * M2 + cj[None, :]
            ym = tok[:, None] & (cj[None, :] < M2)
            y = tl.load(yp, mask=ym, other=0.0)
            tl.store(yp, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ym)

    _FWD, _GRAD = LaunchCache(_kron_fwd), LaunchCache(_kron_grad)
    _BLOCKS = LaunchCache(_kron_block_residual)
    _MAX_OCC = max(c.kwargs["OCC"] for c in _kron_grad.configs)


def _precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _shape_args(t: int, a: torch.Tensor, b: torch.Tensor) -> tuple:
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return (t, 1 << max(0, (t - 1).bit_length()), m1, n1, m2, n2, r,
            _p2(m1), _p2(n1), _p2(m2), _p2(n2), _precision())


def kron_fused(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Σₖ (Aₖ ⊗ Bₖ) x over the last dimension of x (no residual, no bias); with ``out``
    (contiguous, x's leading shape by m1·m2, x's dtype) it is added to ``out`` in place and
    ``out`` returned (no autograd)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    flat = x.dim() == 2  # the common call (from kron_fused_autograd): no reshapes needed
    x2 = x.contiguous() if flat else x.reshape(-1, n1 * n2).contiguous()
    t = x2.shape[0]
    if out is not None and (out.shape != (*x.shape[:-1], m1 * m2) or out.dtype != x.dtype
                            or not out.is_contiguous()):
        raise ValueError(f"kron_fused: out must be a contiguous {x.dtype} tensor of shape "
                         f"{(*x.shape[:-1], m1 * m2)}, got {out.dtype} {tuple(out.shape)}")
    y = torch.empty((t, m1 * m2), device=x.device, dtype=x.dtype) if out is None \
        else out.view(t, m1 * m2)
    if t:
        _FWD(lambda meta: (_programs(x2, cdiv(t, meta["TB"]), meta["OCC"]),),
             x2, a.contiguous(), b.contiguous(), y, *_shape_args(t, a, b),
             ACCUMULATE=out is not None)
    if out is not None:
        return out
    return y if flat else y.reshape(*x.shape[:-1], m1 * m2)


def add_block_residual_(y: torch.Tensor, x2: torch.Tensor, blocks: torch.Tensor,
                        values: torch.Tensor) -> torch.Tensor:
    """In place: y (T, m1·m2) += the block residual (blocks: sorted indices p·n1 + q, values
    (nb, m2, n2)) applied to x2 (T, n1·n2) — the kernel form of
    :func:`layerzip_kronecker.module.add_block_residual` (no autograd)."""
    nb, m2, n2 = values.shape
    t, n = x2.shape
    n1, m1 = n // n2, y.shape[1] // m2
    if not (t and nb):
        return y
    # block-row pointers by binary search (no host sync; the grid covers every block row)
    rowptr = torch.searchsorted(blocks // n1, torch.arange(m1 + 1, device=blocks.device,
                                                           dtype=blocks.dtype)).to(torch.int32)
    _BLOCKS(lambda meta: (cdiv(t, meta["BT"]), m1), x2, values.contiguous(),
            blocks.contiguous(), rowptr, y, t, 1 << max(0, (t - 1).bit_length()), n1, n2, m2,
            _p2(m2), _p2(n2), _precision())
    return y


def kron_factor_grads(x2: torch.Tensor, dy: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dAₖ = Σ_t dY_t Bₖ X_tᵀ and dBₖ = Σ_t dY_tᵀ Aₖ X_t for x2 (T, n), dy (T, m)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    t = x2.shape[0]
    args = _shape_args(t, a, b)
    bm1, bn1, bm2, bn2 = args[7:11]
    # one row of partial sums per (program, term) — dAₖ then dBₖ, flattened; slots of programs
    # a config does not start stay zero. One buffer and one sum: the host cost of this call is
    # what an eager backward pays on top of the kernels.
    slots = _programs(x2, max(t, 1), _MAX_OCC)
    parts = torch.zeros((slots, r, bm1 * bn1 + bm2 * bn2), device=x2.device,
                        dtype=torch.float32)
    if t:
        _GRAD(lambda meta: (_programs(x2, cdiv(t, meta["TB"]), meta["OCC"]), r),
              x2, dy, a.contiguous(), b.contiguous(), parts, *args)
    total = parts.sum(0)
    da = total[:, :bm1 * bn1].view(r, bm1, bn1)[:, :m1, :n1]
    db = total[:, bm1 * bn1:].view(r, bm2, bn2)[:, :m2, :n2]
    return da.to(a.dtype), db.to(b.dtype)


class _KronFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, a, b):
        ctx.save_for_backward(x2, a, b)
        return kron_fused(x2, a, b)

    @staticmethod
    def backward(ctx, dy):
        x2, a, b = ctx.saved_tensors
        dy = dy.contiguous()
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = kron_fused(dy, a.transpose(1, 2), b.transpose(1, 2))   # (A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            da, db = kron_factor_grads(x2, dy, a, b)
            da = da if ctx.needs_input_grad[1] else None
            db = db if ctx.needs_input_grad[2] else None
        return dx, da, db


def kron_fused_autograd(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`kron_fused` that autograd can see through (gradients for x, A and B)."""
    flat = x.dim() == 2
    x2 = x.contiguous() if flat else x.reshape(-1, a.shape[2] * b.shape[2]).contiguous()
    if not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad)):
        y = kron_fused(x2, a, b)
    else:
        y = _KronFused.apply(x2, a, b)
    return y if flat else y.reshape(*x.shape[:-1], a.shape[1] * b.shape[1])
