"""Can the two prefill GEMMs of a low-rank layer overlap? (GPU; a diagnostic.) The first GEMM
reads x (memory-heavy), the second writes y (memory-heavy too) with a short reduction over r:
each alone leaves part of the GPU idle. Here x is cut into token chunks; chunk i's x·V runs on
one stream while chunk i−1's h·Uᵀ (+ bias) runs on a second, both captured in one CUDA graph
(``graph_time``: GPU time, median of 30), against the plain two GEMMs and dense, bf16.

    python3 lowrank_stream_probe.py --out $OUT/lowrank_stream_probe
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from layerzip.bench import graph_time, machine_info, wake_gpu

from lowrank_cases import make_case

CASES = [(8192, 4096, 4096, 256), (8192, 4096, 4096, 512), (8192, 4096, 11008, 256)]


def pipelined(x, v, u, b, y, chunks: int, side: torch.cuda.Stream):
    """x·V chunk by chunk on the current stream; h·Uᵀ + b of each finished chunk on ``side``."""
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
        h = xc @ v
        done = torch.cuda.Event()
        done.record(main)
        with torch.cuda.stream(side):
            side.wait_event(done)
            torch.addmm(b, h, u.t(), out=yc)
            h.record_stream(side)
    main.wait_stream(side)
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [{"machine": machine_info()}]
    side = torch.cuda.Stream()
    for t, n, m, r in CASES:
        x, w, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
        y = torch.empty(t, m, device="cuda", dtype=torch.bfloat16)
        fns = {"dense": lambda: F.linear(x, w, b),
               "two GEMMs": lambda: F.linear(F.linear(x, v.t()), u, b)}
        for chunks in (2, 4, 8):
            fns[f"pipelined, {chunks} chunks"] = \
                lambda chunks=chunks: pipelined(x, v, u, b, y, chunks, side)
        with torch.no_grad():
            want = fns["two GEMMs"]().float()
            for name, fn in fns.items():
                got = fn().float()
                err = float((got - want).norm() / want.norm()) if name != "dense" else None
                wake_gpu()
                timing = graph_time(fn, rounds=30)
                rows.append({"case": [t, n, m, r], "what": name, "us": timing.median * 1e6,
                             "rel_error_vs_two_gemms": err})
                print(json.dumps(rows[-1]), flush=True)
        # drop this case's tensors before the next is made (names, not del: the lambdas
        # above close over them)
        x = w = u = v = b = y = None
        torch.cuda.empty_cache()
    with open(args.out + ".jsonl", "w") as f:
        f.write("\n".join(json.dumps(row) for row in rows) + "\n")


if __name__ == "__main__":
    main()
