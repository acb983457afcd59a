"""Can fp8 beat the bf16 low-rank forward by quantizing x inside the first GEMM? (GPU diagnostic.)

The fp8 backend quantizes x per row in a pass of its own (35.6 µs at T = 8192, n = 4096 on the
H100), which costs about what the fp8 first GEMM saves. A per-row scale needs the whole row
before any of it can be quantized; one scale per tensor does not, if it is known before the
kernel starts: delayed scaling (as in NVIDIA's Transformer Engine) takes it from the absolute
maximum seen by the previous call, which the kernel records as it goes (values beyond it
saturate at ±448). ``xv_fp8_static`` loads x's bf16 tiles, scales and casts them to e4m3 in
registers, and multiplies them with V's e4m3 tiles on the tensor cores; its epilogue writes h
in e4m3 with h's delayed scale (and that scale once per row, for cuBLAS's row-wise fp8 GEMM),
and records both maxima with atomics. The second GEMM is cuBLAS's (``torch._scaled_mm``).

Per case, in one process: dense bf16; the bf16 two-GEMM (cuBLAS); the fp8 backend as shipped
(row scales); cuBLAS's fp8 first GEMM on an x already in e4m3 (a floor for the new kernel);
``xv_fp8_static`` at several tile shapes; the whole delayed-scaling forward with the best of
them. GPU time per call inside a CUDA graph (``graph_time``) and eager time (CUDA events),
error against float64.

    python3 lowrank_fp8_static_probe.py --out $OUT/lowrank_fp8_static_probe
    python3 lowrank_fp8_static_probe.py --report results/lowrank_fp8_static_probe.jsonl
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from layerzip import cdiv
from layerzip_lowrank.backends import lowrank_matmul_reference
from layerzip_lowrank.fp8_kernel import (FP8_MAX, fp8_lowrank, quantize_activation_rows,
                                         quantize_factors)

from lowrank_cases import probe_inputs
from probe_runs import faster, probe_main, report_tables

CASES = [(8192, 4096, 4096, 256), (8192, 4096, 4096, 512), (8192, 4096, 4096, 1024),
         (8192, 4096, 11008, 256), (8192, 4096, 11008, 512)]
# (BM, BN, BK, num_warps, STAGES)
TILES = [(128, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 256, 128, 8, 3),
         (128, 128, 64, 8, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]


@triton.jit
def _xv_fp8_static_kernel(x_desc, vq_desc, vs_ptr, hq_ptr, hs_ptr, scales_ptr, amax_ptr,
                          T, R, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          STAGES: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    sx = tl.load(scales_ptr)      # x ≈ xq · sx, from the previous call's maximum
    sh = tl.load(scales_ptr + 1)  # the same for h
    inv_sx = 1.0 / sx
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_amax = tl.zeros((BM, BK), dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        xt = x_desc.load([pm * BM, k]).to(tl.float32)
        x_amax = tl.maximum(x_amax, tl.abs(xt))
        xq = tl.clamp(xt * inv_sx, -448.0, 448.0).to(tl.float8e4nv)
        acc = tl.dot(xq, vq_desc.load([pn * BN, k]).T, acc)
    rows = pm * BM + tl.arange(0, BM)
    cols = pn * BN + tl.arange(0, BN)
    h = acc * (sx * tl.load(vs_ptr + cols, mask=cols < R, other=0.0))[None, :]
    mask = (rows < T)[:, None] & (cols < R)[None, :]
    hq = tl.clamp(h * (1.0 / sh), -448.0, 448.0).to(tl.float8e4nv)
    tl.store(hq_ptr + rows[:, None] * R + cols[None, :], hq, mask=mask)
    if pn == 0:  # cuBLAS's row-wise fp8 GEMM wants a scale per row of h: all the same here
        tl.store(hs_ptr + rows, tl.zeros((BM,), dtype=tl.float32) + sh, mask=rows < T)
    tl.atomic_max(amax_ptr, tl.max(tl.max(x_amax, axis=1), axis=0))
    tl.atomic_max(amax_ptr + 1, tl.max(tl.max(tl.where(mask, tl.abs(h), 0.0), axis=1), axis=0))


@triton.jit
def _roll_scales_kernel(scales_ptr, amax_ptr):
    """scales ← maxima / 448, maxima ← 0: the next call's delayed scales."""
    i = tl.arange(0, 2)
    amax = tl.load(amax_ptr + i)
    tl.store(scales_ptr + i, tl.maximum(amax, 1e-30) * (1.0 / 448.0))
    tl.store(amax_ptr + i, tl.zeros((2,), dtype=tl.float32))


class DelayedFP8:
    """State of one layer: its e4m3 factors and the delayed scales of x and h."""

    def __init__(self, x, u, v):
        self.f = quantize_factors(u, v)
        self.scales = torch.empty(2, device=x.device, dtype=torch.float32)
        self.amax = torch.zeros(2, device=x.device, dtype=torch.float32)
        # first call: the scales come from x and h themselves
        h = x @ v
        self.scales[0] = x.abs().amax().float() / FP8_MAX
        self.scales[1] = h.abs().amax().float() / FP8_MAX

    def xv(self, x, tiles):
        bm, bn, bk, warps, stages = tiles
        t, n = x.shape
        r = self.f.vq.shape[0]
        hq = torch.empty((t, r), device=x.device, dtype=torch.float8_e4m3fn)
        hs = torch.empty((t, 1), device=x.device, dtype=torch.float32)
        _xv_fp8_static_kernel[(cdiv(t, bm), cdiv(r, bn))](
            TensorDescriptor.from_tensor(x, [bm, bk]),
            TensorDescriptor.from_tensor(self.f.vq, [bn, bk]), self.f.vs, hq, hs,
            self.scales, self.amax, t, r, n, BM=bm, BN=bn, BK=bk, STAGES=stages,
            num_warps=warps)
        return hq, hs

    def forward(self, x, bias, tiles):
        hq, hs = self.xv(x, tiles)
        y = torch._scaled_mm(hq, self.f.uq.t(), scale_a=hs, scale_b=self.f.us.view(1, -1),
                             bias=bias, out_dtype=x.dtype, use_fast_accum=True)
        _roll_scales_kernel[(1,)](self.scales, self.amax, num_warps=1)
        return y[:, :self.f.m] if y.shape[1] != self.f.m else y


def report(path: str) -> str:
    """Markdown tables of a run: each entry against the bf16 GEMM it would replace (first GEMMs
    against cuBLAS's bf16 x·V, whole forwards against the bf16 two-GEMM)."""
    def vs(case, rows, what, row):
        if what in ("dense", "bf16_two_gemm", "bf16_gemm1"):
            return [""]
        base = "bf16_gemm1" if what.startswith(("xv_", "fp8_gemm1")) else "bf16_two_gemm"
        return [f"{rows[base]['graph_ms'] / row['graph_ms']:.2f}×"]

    return report_tables(path, ["vs bf16 (GPU)"], vs)


def probe_case(t, n, m, r, record):
    case = [t, n, m, r]
    x, w, u, v, b, ref_h, ref = probe_inputs(t, n, m, r)
    state = DelayedFP8(x, u, v)
    f = state.f
    xq, xs = quantize_activation_rows(x)
    record(case, "dense", lambda: F.linear(x, w, b))
    record(case, "bf16_two_gemm", lambda: lowrank_matmul_reference(x, u, v, b), ref)
    record(case, "bf16_gemm1", lambda: x @ v, ref_h)
    record(case, "fp8_rows (shipped)", lambda: fp8_lowrank(x, f, b), ref)
    record(case, "fp8_gemm1_cublas_prequantized",
           lambda: torch._scaled_mm(xq, f.vq.t(), scale_a=xs, scale_b=f.vs.view(1, -1),
                                    out_dtype=torch.bfloat16, use_fast_accum=True), ref_h)
    best = None
    for tiles in TILES:
        row = record(case, f"xv_fp8_static {tiles}", lambda tiles=tiles: state.xv(x, tiles),
                     ref_h, dequantize=lambda hs: hs[0].float() * hs[1])
        best = faster(best, row, tiles, 0.1)
    if best is not None:
        tiles = best[1]
        record(case, f"fp8_delayed {tiles}", lambda: state.forward(x, b, tiles), ref)


if __name__ == "__main__":
    probe_main(CASES, probe_case, report)
