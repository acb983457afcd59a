"""Where the LLaMA-shaped model's GPU time goes, dense and low-rank (GPU; a diagnostic for
test_lowrank_llama.py's end-to-end figures). torch.profiler records every kernel of a few calls
of the prefill (eager, torch.compile'd, and compiled with attention told it is causal instead
of given a mask: llama_cases.causal_attention) and of the decode step (torch.compile'd), launched
without a CUDA graph so that each kernel shows, and sums their GPU time by kind: GEMMs
(cuBLAS), the low-rank Triton kernels (decode, fused), attention (SDPA's kernels), and
everything else (norms, rotary embeddings, SiLU gating, residual adds, embedding, cache
writes). Sums of kernel durations: no overlap between kernels is counted, so the dependent
launches of the compiled case are not what this measures.

    python3 lowrank_llama_profile.py --out $OUT/lowrank_llama_profile
    python3 lowrank_llama_profile.py --report results/lowrank_llama_profile.jsonl
"""

from __future__ import annotations

import argparse
import json

import layerzip
import torch
from layerzip.bench import machine_info
from torch.profiler import ProfilerActivity, profile

from llama_cases import (BATCH, PREFILL, VOCAB, causal_attention, compressed, decode_step,
                         last_logits_only, llama)
from lowrank_cases import compiled
from probe_runs import run_or_report, write_rows

KINDS = [("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
         ("low-rank Triton kernels", ("_decode_kernel", "_lowrank_fused_kernel")),
         ("GEMM", ("gemm", "nvjet", "xmma", "cutlass", "splitk", "sm90", "ampere"))]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    for kind, marks in KINDS:
        if any(mark in name for mark in marks):
            return kind
    return "other"


def kernel_times(fn, calls: int = 5) -> dict[str, float]:
    """Per call: µs of GPU time by kernel name."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.key_averages():
        if str(e.device_type).endswith("CUDA"):
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
            times[e.key] = times.get(e.key, 0.0) + us / calls
    return times


def summary(what: str, times: dict[str, float]) -> dict:
    by_kind: dict[str, float] = {}
    for name, us in times.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
    top = sorted(times.items(), key=lambda kv: -kv[1])[:8]
    return {"what": what, "total_us": sum(times.values()), "by_kind_us": by_kind,
            "top": [[name[:90], us] for name, us in top]}


def report(path: str) -> str:
    """The markdown table of a run's kernel sums by kind (ms per call, share of the total)."""
    kinds = ["GEMM", "low-rank Triton kernels", "attention", "other"]
    lines = ["| what | all kernels | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    with open(path) as f:
        for row in map(json.loads, f):
            if "by_kind_us" not in row:
                continue
            total = row["total_us"]
            cells = [f"{row['by_kind_us'][k] / 1e3:.2f} ({row['by_kind_us'][k] / total:.0%})"
                     if k in row["by_kind_us"] else "—" for k in kinds]
            lines.append(f"| {row['what']} | {total / 1e3:.2f} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = run_or_report(argparse.ArgumentParser(), report)
    if args is None:
        return
    out = args.out
    rows = [{"machine": machine_info()}]
    dense = llama()
    low = compressed(dense, "blocks")
    ids = torch.randint(0, VOCAB, (1, PREFILL), device="cuda")
    keep = last_logits_only(dense)

    def prefill(m):
        return m(input_ids=ids, use_cache=False, **keep).logits

    with torch.no_grad():
        for name, model in (("dense", dense), ("low-rank", low)):
            rows.append(summary(f"prefill {PREFILL}, eager, {name}",
                                kernel_times(lambda m=model: prefill(m))))
            print(json.dumps(rows[-1]), flush=True)
        steps = [decode_step(dense), decode_step(low)]
        for step in steps:
            step()  # autotune measures the decode shapes before compiling
        for phase in ("prefill", "decode step"):
            (cd, cl), settings = compiled(False, dense, low)
            for name, step, model in (("dense", steps[0], cd), ("low-rank", steps[1], cl)):
                if phase == "prefill":
                    call = lambda m=model: prefill(m)  # noqa: E731
                else:
                    call = lambda s=step, m=model: s(m)  # noqa: E731
                with settings:
                    call()  # compile
                rows.append(summary(f"{phase}, compiled, {name}", kernel_times(call)))
                print(json.dumps(rows[-1]), flush=True)
        with causal_attention(dense, low):  # no mask built: what the mask costs compiled
            (cd, cl), settings = compiled(False, dense, low)
            for name, model in (("dense", cd), ("low-rank", cl)):
                with settings:
                    prefill(model)  # compile
                rows.append(summary(f"prefill, compiled, causal attention, {name}",
                                    kernel_times(lambda m=model: prefill(m))))
                print(json.dumps(rows[-1]), flush=True)
    auto = layerzip.get_backend("lowrank_matmul", "autotune")
    for tokens in (PREFILL, BATCH):
        rows.append({"what": f"autotune's choices at {tokens} tokens", "shapes": {
            str(shape): {"choice": seen["choice"], "graph_choice": seen["graph_choice"],
                         "eager_us": {n: e * 1e6 for n, (e, _) in seen["seconds"].items()},
                         "graph_us": {n: None if g is None else g * 1e6
                                      for n, (_, g) in seen["seconds"].items()}}
            for shape, seen in auto.measured_at(tokens).items()}})
        print(json.dumps(rows[-1]), flush=True)
    write_rows(out + ".jsonl", rows)


if __name__ == "__main__":
    main()
