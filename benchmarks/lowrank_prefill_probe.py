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
import json
import time

import torch
import torch.nn.functional as F

from layerzip.bench import graph_time, machine_info, time_callable, wake_gpu

from lowrank_cases import make_case

CASES = [(8192, 4096, 4096, 256), (8192, 4096, 4096, 512), (8192, 4096, 4096, 1024),
         (8192, 4096, 11008, 256), (8192, 4096, 11008, 512)]


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    from layerzip_lowrank.backends import lowrank_matmul_reference
    from layerzip_lowrank.fp8_kernel import (fp8_lowrank, quantize_activation_rows,
                                             quantize_factors)

    rows = []
    for t, n, m, r in CASES:
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
        if args.compile and m == 4096 and r in (256, 512):  # minutes of autotuning each
            compiled = torch.compile(lowrank_matmul_reference, mode="max-autotune-no-cudagraphs",
                                     dynamic=False)
            fns["bf16_compile_max_autotune"] = lambda: compiled(x, u, v, b)
        errors = {"fp8_rows": rel(fp8_lowrank(x, f, b), ref),
                  "bf16_two_gemm": rel(lowrank_matmul_reference(x, u, v, b), ref)}
        with torch.no_grad():
            for name, fn in fns.items():
                t0 = time.perf_counter()
                try:
                    fn()
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a probe records what failed
                    rows.append({"case": [t, n, m, r], "what": name,
                                 "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                first_s = time.perf_counter() - t0
                wake_gpu()
                timing = time_callable(fn, rounds=args.rounds, warmup=5)
                try:
                    graphed = graph_time(fn, rounds=args.rounds).median * 1e3
                except Exception as exc:  # noqa: BLE001
                    graphed = f"{type(exc).__name__}: {exc}"[:200]
                rows.append({"case": [t, n, m, r], "what": name, "ms": timing.median * 1e3,
                             "graph_ms": graphed, "first_call_s": first_s,
                             "rel_error": errors.get(name)})
                print(json.dumps(rows[-1]), flush=True)
        del x, w, u, v, b, xq_rows, h, hq
        torch.cuda.empty_cache()
    with open(args.out + ".jsonl", "w") as f:
        f.write(json.dumps({"machine": machine_info()}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
