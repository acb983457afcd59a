"""Where the time of a low-rank prefill goes (GPU; a diagnostic beside the suite).

For T = 8192 rows and each (m, r), in one process: dense bf16; the bf16 two-GEMM (cuBLAS) and
each of its GEMMs; the fp8 path (x and h quantized per row, cuBLAS fp8 GEMMs) and each piece;
optionally (--compile) torch.compile max-autotune of the bf16 two-GEMM. Every entry is timed
twice: eagerly (CUDA events around each call, median) and per call inside a CUDA graph
(``graph_time``: GPU time without the host's launch cost, which exceeds the GPU time of the
small pieces). Writes JSON lines. Commit a93398a
also measured persistent Triton GEMMs and a Triton first GEMM quantizing x itself (both slower;
results/lowrank_prefill_probe.md).

    python3 lowrank_prefill_probe.py --out $OUT/lowrank_prefill_probe [--compile]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lowrank_cases import make_case
from probe_runs import ProbeRecorder

CASES = [(8192, 4096, 4096, 256), (8192, 4096, 4096, 512), (8192, 4096, 4096, 1024),
         (8192, 4096, 11008, 256), (8192, 4096, 11008, 512)]


def probe_case(t, n, m, r, record, compile_):
    """Every entry for one case (its tensors are freed on return)."""
    from layerzip_lowrank.backends import lowrank_matmul_reference
    from layerzip_lowrank.fp8_kernel import (fp8_lowrank, quantize_activation_rows,
                                             quantize_factors)

    x, w, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
    f = quantize_factors(u, v)
    vq, vs, uq, us = f.vq, f.vs, f.uq, f.us
    xq_rows, xs_rows = quantize_activation_rows(x)
    h = x @ v
    hq, hs = quantize_activation_rows(h)
    ref = (x.double() @ v.double()) @ u.double().t() + b.double()
    fns = {
        "dense": lambda: F.linear(x, w, b),
        "bf16_two_gemm": lambda: lowrank_matmul_reference(x, u, v, b),
        "bf16_gemm1": lambda: x @ v,
        "bf16_gemm2": lambda: F.linear(h, u, b),
        "fp8_rows": lambda: fp8_lowrank(x, f, b),
        "fp8_quantize_h": lambda: quantize_activation_rows(h),
        "fp8_gemm2_cublas": lambda: torch._scaled_mm(
            hq, uq.t(), scale_a=hs, scale_b=us.view(1, -1), bias=b,
            out_dtype=torch.bfloat16, use_fast_accum=True),
        "fp8_quantize_x": lambda: quantize_activation_rows(x),
        "fp8_gemm1_cublas_prequantized": lambda: torch._scaled_mm(
            xq_rows, vq.t(), scale_a=xs_rows, scale_b=vs.view(1, -1),
            out_dtype=torch.bfloat16, use_fast_accum=True),
    }
    if compile_ and m == 4096 and r in (256, 512):  # minutes of autotuning each
        compiled = torch.compile(lowrank_matmul_reference, mode="max-autotune-no-cudagraphs",
                                 dynamic=False)
        fns["bf16_compile_max_autotune"] = lambda: compiled(x, u, v, b)
    refs = {"fp8_rows": ref, "bf16_two_gemm": ref}
    with torch.no_grad():
        for name, fn in fns.items():
            record([t, n, m, r], name, fn, refs.get(name))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    record = ProbeRecorder(args.rounds)
    for t, n, m, r in CASES:
        probe_case(t, n, m, r, record, args.compile)
        torch.cuda.empty_cache()
    record.write(args.out + ".jsonl")


if __name__ == "__main__":
    main()
