"""Fused low-rank forward in Triton: y = (x V) Uᵀ + b in one launch.

Each program owns BM rows of x. Phase 1 computes its rows of h = x V (BM × r, in chunks of BR
columns, accumulated in fp32) and writes them to a small scratch buffer (T × r, which stays in
L2); phase 2 sweeps the output columns in BN tiles, reading its own h rows back and Uᵀ tiles,
adds the bias and writes y once. No program reads another's h, so one CTA barrier between the
phases is the only synchronization. This replaces torch's first GEMM, whose N = r is too
narrow to fill the GPU (T/128 tiles), and removes the second launch.

Inference only (no autograd): the module falls back to the reference for inputs that need
gradients. Tested against the reference on CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

from layerzip import LaunchCache, cdiv, triton_interpreted

INTERPRET = triton_interpreted()


def _configs():
    if INTERPRET:  # the interpreter is slow: one small, valid configuration
        return [triton.Config({"BM": 16, "BK": 32, "BN": 32, "BKR": 16}, num_warps=1)]
    if os.environ.get("LAYERZIP_TRITON_QUICK") == "1":  # correctness runs: two tile shapes
        return [triton.Config({"BM": 32, "BK": 64, "BN": 128, "BKR": 64}, num_warps=4),
                triton.Config({"BM": 128, "BK": 64, "BN": 128, "BKR": 64}, num_warps=8)]
    out = []
    for bm in (32, 64, 128):
        for bk in (64,):
            for bn in (128, 256):
                for warps in (4, 8):
                    for stages in (3, 4):
                        if bm == 128 and bn == 256 and warps == 4:
                            continue
                        out.append(triton.Config({"BM": bm, "BK": bk, "BN": bn, "BKR": 64},
                                                 num_warps=warps, num_stages=stages))
    return out


if triton is not None:

    @triton.autotune(configs=_configs(), key=["T_BUCKET", "N_IN", "M_OUT", "R"])
    @triton.jit
    def _lowrank_fused_kernel(
        x_ptr, v_ptr, u_ptr, b_ptr, h_ptr, y_ptr,
        T, N_IN, M_OUT, R, T_BUCKET,
        sxt, sxn, svn, svr, sum_, sur, sht, shr, syt, sym,
        HAS_BIAS: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BKR: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < T
        # phase 1: h[rows, :] = x[rows, :] @ V
        for r0 in range(0, R, BR):
            rc = r0 + tl.arange(0, BR)
            acc = tl.zeros((BM, BR), dtype=tl.float32)
            for k0 in range(0, N_IN, BK):
                ks = k0 + tl.arange(0, BK)
                xt = tl.load(x_ptr + rows[:, None] * sxt + ks[None, :] * sxn,
                             mask=rmask[:, None] & (ks[None, :] < N_IN), other=0.0)
                vt = tl.load(v_ptr + ks[:, None] * svn + rc[None, :] * svr,
                             mask=(ks[:, None] < N_IN) & (rc[None, :] < R), other=0.0)
                acc = tl.dot(xt, vt, acc, input_precision=PRECISION)
            tl.store(h_ptr + rows[:, None] * sht + rc[None, :] * shr,
                     acc.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & (rc[None, :] < R))
        tl.debug_barrier()  # this program's h rows, written above, are read by all its threads
        # phase 2: y[rows, cols] = h[rows, :] @ U[cols, :]ᵀ + b[cols]
        for n0 in range(0, M_OUT, BN):
            cols = n0 + tl.arange(0, BN)
            cmask = cols < M_OUT
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, R, BKR):
                ks = k0 + tl.arange(0, BKR)
                ht = tl.load(h_ptr + rows[:, None] * sht + ks[None, :] * shr,
                             mask=rmask[:, None] & (ks[None, :] < R), other=0.0)
                ut = tl.load(u_ptr + cols[None, :] * sum_ + ks[:, None] * sur,
                             mask=cmask[None, :] & (ks[:, None] < R), other=0.0)
                acc = tl.dot(ht, ut, acc, input_precision=PRECISION)
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rows[:, None] * syt + cols[None, :] * sym,
                     acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    _FUSED = LaunchCache(_lowrank_fused_kernel)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def lowrank_fused(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x @ v) @ uᵀ + bias over the last dimension of x, in one Triton launch."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    t, n = x2.shape
    m, r = u.shape
    h = torch.empty((t, r), device=x.device, dtype=x.dtype)
    y = torch.empty((t, m), device=x.device, dtype=x.dtype)
    br = min(max(16, _next_pow2(r)), 256)

    def grid(meta):
        return (cdiv(t, meta["BM"]),)

    _FUSED(grid,
        x2, v, u, bias if bias is not None else y, h, y,
        t, n, m, r, _next_pow2(t),
        x2.stride(0), x2.stride(1), v.stride(0), v.stride(1), u.stride(0), u.stride(1),
        h.stride(0), h.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BR=br,
        # float32 inputs follow torch's own matmul setting (IEEE unless TF32 is allowed)
        PRECISION="tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
    )
    return y.reshape(*lead, m)
