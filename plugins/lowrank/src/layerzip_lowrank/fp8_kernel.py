"""FP8 low-rank forward: y = (x V) Uᵀ + b with both GEMMs in float8 e4m3.

x (bf16/fp16) is quantized per row in one Triton pass (absolute maximum of the row → scale to
±448 → e4m3), the first GEMM is cuBLAS's fp8 GEMM with per-row scales (``torch._scaled_mm``),
h is quantized per row the same way, and the second GEMM adds the bias in cuBLAS's epilogue.
The factors are quantized once per row of vᵀ and of u. Measured on the H100 at T = 8192
(benchmarks/results/lowrank_prefill_probe.md): 0.77-1.26× of the bf16 two-GEMM. Quantizing x is
a pass over it (35.6 µs at 2.7 TB/s) that costs about what fp8 saves in the first GEMM, and
writing y in bf16 bounds the second GEMM in both precisions. Quantizing x inside a Triton first
GEMM instead (1 × 128 groups) measured 2-5× slower than this pass plus cuBLAS; that kernel
lived in commit a93398a.

Under torch.compile the backend runs :func:`fp8_lowrank_traceable`, the same scheme in torch ops.

Inference only. Tested against a float64 emulation of the quantization on CPU with
TRITON_INTERPRET=1 (the interpreter emulates e4m3; torch's CPU _scaled_mm does the GEMMs there).
"""

from __future__ import annotations

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
INTERPRET = triton_interpreted()


if triton is not None:

    @triton.jit
    def _to_e4m3(v, ROUND_FIRST: tl.constexpr):
        """fp32 → e4m3, round to nearest even. Triton's CPU interpreter (3.9) rounds without
        carrying into the exponent (127.4 → 64 instead of 128), so there (ROUND_FIRST) the value
        is first rounded to e4m3's three mantissa bits in integer arithmetic, which carries
        correctly, and its cast then only drops zero bits. The GPU converts in hardware."""
        # (448.0 in the kernels below is e4m3's largest finite value, FP8_MAX)
        if ROUND_FIRST:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
            v = bits.to(tl.float32, bitcast=True)
        return v.to(tl.float8e4nv)

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

    _QUANTIZE = LaunchCache(_quantize_rows_kernel)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 per-row scales (rows × 1) with t ≈ q * scale, in plain torch."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-30)
    scale = amax / FP8_MAX
    q = (t.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_weight_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row) with w ≈ q · scale[:, None]; row-major q."""
    q, scale = quantize_rows(w)
    return q.contiguous(), scale.view(-1).contiguous()


def quantize_activation_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows × cols contiguous, float32 rows × 1 scales) with a ≈ q · scale, in one pass of a
    Triton kernel (x and h of the fp8 path)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    t, r = a.shape
    rp = max(16, _next_pow2(r))
    bt = max(1, min(64, 8192 // rp))
    q = torch.empty((t, r), device=a.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((t, 1), device=a.device, dtype=torch.float32)
    _QUANTIZE((cdiv(t, bt),), a, q, s, t, r, a.stride(0), a.stride(1), BT=bt, RP=rp,
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


def fp8_lowrank(x: torch.Tensor, f: FP8Factors, bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x @ V) @ Uᵀ + bias with U, V from :func:`quantize_factors`; x in bf16 or fp16."""
    return _fp8_gemms(x, f, bias, quantize_activation_rows)


def fp8_lowrank_traceable(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """The same scheme in plain torch ops, for torch.compile to trace. Inductor fuses the
    quantization of x into the kernel that produced x: after an RMSNorm it adds 10-17 µs to
    the norm at T = 8192, n = 4096, where the eager path's own pass takes 36. The factors are
    quantized inside the graph: on every call, unless inductor's ``freezing`` folds that into
    constants. Compiled blocks of norm and layer measure 0.97-1.24× of bf16's with freezing,
    0.89-1.13× without (results/lowrank_fp8_compile_probe.md)."""
    return _fp8_gemms(x, quantize_factors(u, v), bias, quantize_rows)


def _fp8_gemms(x: torch.Tensor, f: FP8Factors, bias: torch.Tensor | None,
               quantize_rows_of) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows_of(x2)
    h = torch._scaled_mm(xq, f.vq.t(), scale_a=xs, scale_b=f.vs.view(1, -1),
                         out_dtype=x.dtype, use_fast_accum=True)
    hq, hs = quantize_rows_of(h)
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
