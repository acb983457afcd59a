"""Does the storage layout of the factors, or the bias epilogue, move cuBLAS's time for the two
low-rank GEMMs at prefill? (GPU; a diagnostic.) Each variant is timed per call inside a CUDA
graph (``graph_time``: GPU time) in one process, T = 8192, bf16. Writes JSON lines.

    python3 lowrank_layout_probe.py --out $OUT/lowrank_layout_probe
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from layerzip.bench import graph_time, machine_info, wake_gpu

from lowrank_cases import make_case

CASES = [(8192, 4096, 4096, 256), (8192, 4096, 4096, 512), (8192, 4096, 4096, 1024),
         (8192, 4096, 11008, 256)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [{"machine": machine_info()}]
    for t, n, m, r in CASES:
        x, w, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
        vt = v.t().contiguous()   # (r, n): the first GEMM as F.linear(x, vt), both K-major
        ut = u.t().contiguous()   # (r, m): the second as h @ ut, B row-major
        h = x @ v
        y = torch.empty(t, m, device="cuda", dtype=torch.bfloat16)
        fns = {
            "dense": lambda: F.linear(x, w, b),
            "gemm1 x@v (v n×r)": lambda: x @ v,
            "gemm1 F.linear(x, vᵀ contiguous)": lambda: F.linear(x, vt),
            "gemm2 F.linear(h, u, b)": lambda: F.linear(h, u, b),
            "gemm2 F.linear(h, u)": lambda: F.linear(h, u),
            "gemm2 addmm(b, h, uᵀ)": lambda: torch.addmm(b, h, u.t()),
            "gemm2 mm(h, uᵀ, out=)": lambda: torch.mm(h, u.t(), out=y),
            "gemm2 h @ (uᵀ contiguous)": lambda: h @ ut,
            "both: reference": lambda: F.linear(F.linear(x, v.t()), u, b),
            "both: F.linear(x, vᵀc), F.linear(·, u, b)": lambda: F.linear(F.linear(x, vt), u, b),
        }
        with torch.no_grad():
            for name, fn in fns.items():
                fn()
                wake_gpu()
                timing = graph_time(fn, rounds=30)
                rows.append({"case": [t, n, m, r], "what": name, "us": timing.median * 1e6})
                print(json.dumps(rows[-1]), flush=True)
        # drop this case's tensors before the next is made (names, not del: the lambdas
        # above close over them)
        x = w = u = v = b = vt = ut = h = y = None
        torch.cuda.empty_cache()
    with open(args.out + ".jsonl", "w") as f:
        f.write("\n".join(json.dumps(row) for row in rows) + "\n")


if __name__ == "__main__":
    main()
