"""FP8 low-rank forward for many rows (prefill): y = (x V) Uᵀ + b with both GEMMs in float8 e4m3.

Quantizing the activations in a separate pass reads x (bf16) and writes it again as fp8: at
T = 8192, n = 4096 that pass alone costs about as much as a bf16 first GEMM. So the first GEMM
quantizes its x tiles itself, as it loads them:

1. ``h = x V`` (Triton, below): each program owns a BM × BN tile of h and walks the input in
   groups of GROUP = 128 columns. Per row and group it takes the absolute maximum of the bf16
   tile, scales the group into e4m3's range, multiplies it with the fp8 weight tile on the
   tensor cores and adds the product, times that row's scale, into an fp32 accumulator (the
   1 × 128 activation scaling of DeepSeek-V3; the scale is applied per group, so the tensor
   cores' limited fp8 accumulation never spans more than 128 products). Weights are quantized
   once per output column (a column of V). h is written in the input dtype.
2. ``h`` is quantized per row (another small Triton kernel: T × r, in L2).
3. ``y = h Uᵀ + b``: cuBLAS's fp8 GEMM with per-row scales (``torch._scaled_mm``), bias fused.

Inference only. Tested against a float64 reference on CPU with TRITON_INTERPRET=1 (the
interpreter emulates e4m3), and against the bf16 backends on the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

from layerzip import LaunchCache, cdiv, triton_interpreted

from .triton_kernel import _next_pow2

FP8_MAX = 448.0
#: activation scale group along the input dimension (columns of x sharing one scale per row)
GROUP = 128
INTERPRET = triton_interpreted()


def _configs():
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 32, "GROUP_M": 1}, num_warps=1)]
    if os.environ.get("LAYERZIP_TRITON_QUICK") == "1":
        return [triton.Config({"BM": 128, "BN": 128, "GROUP_M": 8}, num_warps=8, num_stages=3)]
    out = []
    for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
                                  (64, 256, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4),
                                  (128, 256, 8, 2), (256, 128, 8, 3)):
        out.append(triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))
    return out


if triton is not None:

    @triton.jit
    def _to_e4m3(v, ROUND_FIRST: tl.constexpr):
        """fp32 → e4m3, round to nearest even. Triton's CPU interpreter (3.9) rounds without
        carrying into the exponent (127.4 → 64 instead of 128), so there (ROUND_FIRST) the value is
        first rounded to e4m3's three mantissa bits in integer arithmetic, which carries
        correctly, and its cast then only drops zero bits. The GPU converts in hardware."""
        # (448.0 in the kernels below is e4m3's largest finite value, FP8_MAX)
        if ROUND_FIRST:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
            v = bits.to(tl.float32, bitcast=True)
        return v.to(tl.float8e4nv)

    @triton.autotune(configs=_configs(), key=["T_BUCKET", "N_IN", "R"])
    @triton.jit
    def _fp8_gemm1_kernel(
        x_ptr, wq_ptr, ws_ptr, h_ptr,
        T, N_IN, R, T_BUCKET,
        sxt, sxn, swr, swn, sht, shr,
        BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, BK: tl.constexpr,
        ROUND_FIRST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # grouped order: programs running together share rows of x (read from DRAM once,
        # then from L2 by the other column tiles)
        n_m = tl.cdiv(T, BM)
        n_n = tl.cdiv(R, BN)
        per_group = GROUP_M * n_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rmask = rows < T
        cmask = cols < R
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, N_IN, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < N_IN
            xt = tl.load(x_ptr + rows[:, None] * sxt + ks[None, :] * sxn,
                         mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(xt), axis=1), 1e-30)
            xq = _to_e4m3(xt * (448.0 / amax)[:, None], ROUND_FIRST)
            wt = tl.load(wq_ptr + cols[None, :] * swr + ks[:, None] * swn,
                         mask=cmask[None, :] & kmask[:, None], other=0.0)
            acc += tl.dot(xq, wt) * (amax * (1.0 / 448.0))[:, None]
        acc *= tl.load(ws_ptr + cols, mask=cmask, other=0.0)[None, :]
        tl.store(h_ptr + rows[:, None] * sht + cols[None, :] * shr,
                 acc.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _quantize_rows_kernel(h_ptr, q_ptr, s_ptr, T, R, sht, shr,
                              BT: tl.constexpr, RP: tl.constexpr, ROUND_FIRST: tl.constexpr):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.arange(0, RP)
        mask = (rows < T)[:, None] & (cols < R)[None, :]
        h = tl.load(h_ptr + rows[:, None] * sht + cols[None, :] * shr, mask=mask,
                    other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(h), axis=1), 1e-30)
        tl.store(q_ptr + rows[:, None] * R + cols[None, :],
                 _to_e4m3(h * (448.0 / amax)[:, None], ROUND_FIRST), mask=mask)
        tl.store(s_ptr + rows, amax * (1.0 / 448.0), mask=rows < T)

    _GEMM1 = LaunchCache(_fp8_gemm1_kernel)
    _QUANTIZE = LaunchCache(_quantize_rows_kernel)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values and float32 per-row scales (rows × 1) with t ≈ q * scale, in torch."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-30)
    scale = amax / FP8_MAX
    q = (t.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_weight_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row) with w ≈ q · scale[:, None]; row-major q."""
    q, scale = quantize_rows(w)
    return q.contiguous(), scale.view(-1).contiguous()


def fp8_first_gemm(x2: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """h = x2 @ (wq · ws[:, None])ᵀ for x2 (T × n, bf16/fp16), wq (r × n, e4m3), ws (r,):
    x2 quantized on the fly in 1 × GROUP groups. Returns h (T × r) in x2's dtype."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    t, n = x2.shape
    r = wq.shape[0]
    h = torch.empty((t, r), device=x2.device, dtype=x2.dtype)

    def grid(meta):
        return (cdiv(t, meta["BM"]) * cdiv(r, meta["BN"]),)

    _GEMM1(grid, x2, wq, ws, h, t, n, r, _next_pow2(t),
           x2.stride(0), x2.stride(1), wq.stride(0), wq.stride(1), h.stride(0), h.stride(1),
           BK=GROUP, ROUND_FIRST=INTERPRET)
    return h


def quantize_activation_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 T × r contiguous, float32 T × 1 scales) with h ≈ q · scale, one pass."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    t, r = h.shape
    rp = max(16, _next_pow2(r))
    bt = max(1, min(64, 8192 // rp))
    q = torch.empty((t, r), device=h.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((t, 1), device=h.device, dtype=torch.float32)
    _QUANTIZE((cdiv(t, bt),), h, q, s, t, r, h.stride(0), h.stride(1), BT=bt, RP=rp,
              ROUND_FIRST=INTERPRET, num_warps=4)
    return q, s


@dataclass(frozen=True)
class FP8Factors:
    """U and V in e4m3 with a float32 scale per row of vᵀ and of u. cuBLAS's fp8 GEMM wants
    dimensions that are multiples of 16: r and m are zero-padded to them (zero rows add
    nothing; the padded output columns are cut off)."""

    vq: torch.Tensor  # (r16, n): vᵀ
    vs: torch.Tensor  # (r16,)
    uq: torch.Tensor  # (m16, r16)
    us: torch.Tensor  # (m16,)
    m: int


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def quantize_factors(u: torch.Tensor, v: torch.Tensor) -> FP8Factors:
    """u (m × r) and v (n × r) of y = (x v) uᵀ, quantized for :func:`fp8_lowrank`."""
    (m, r), n = u.shape, v.shape[0]
    r16, m16 = cdiv(r, 16) * 16, cdiv(m, 16) * 16
    vq, vs = quantize_weight_rows(_pad_to(v.detach().t(), r16, n))
    uq, us = quantize_weight_rows(_pad_to(u.detach(), m16, r16))
    return FP8Factors(vq, vs, uq, us, m)


def fp8_lowrank(x: torch.Tensor, f: FP8Factors, bias: torch.Tensor | None, *,
                quantize_in_gemm: bool = False) -> torch.Tensor:
    """y = (x @ V) @ Uᵀ + bias with U, V from :func:`quantize_factors`; x in bf16 or fp16.

    ``quantize_in_gemm``: the first GEMM is the Triton kernel above, quantizing x in 1 × 128
    groups as it loads it; otherwise x is quantized per row in one pass and both GEMMs are
    cuBLAS's (faster on the H100 at every shape measured: benchmarks/results/lowrank_fp8.md)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if quantize_in_gemm:
        h = fp8_first_gemm(x2, f.vq, f.vs)
    else:
        xq, xs = quantize_activation_rows(x2)
        h = torch._scaled_mm(xq, f.vq.t(), scale_a=xs, scale_b=f.vs.view(1, -1),
                             out_dtype=x.dtype, use_fast_accum=True)
    hq, hs = quantize_activation_rows(h)
    m16 = f.uq.shape[0]
    if bias is not None:
        bias = bias.to(x.dtype)
        if m16 != f.m:
            bias = torch.nn.functional.pad(bias, (0, m16 - f.m))
    y = torch._scaled_mm(hq, f.uq.t(), scale_a=hs, scale_b=f.us.view(1, -1), bias=bias,
                         out_dtype=x.dtype, use_fast_accum=True)
    if m16 != f.m:
        y = y[:, :f.m].contiguous()
    return y.reshape(*lead, f.m)
