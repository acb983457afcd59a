"""Does fp8 pay once x's quantization is fused into the op that produces x? (GPU.) The eager
fp8 backend quantizes x in a pass of its own, which costs about what its first GEMM saves
(lowrank_prefill_probe.md). Under torch.compile the backend runs the same scheme in torch ops,
and inductor can fuse that quantization into the kernel before the layer. Here the layer
follows an RMSNorm, as every projection of a LLaMA block does, and the norm + layer block is
compiled whole, bf16 low-rank against fp8 low-rank, and fp8 once more with inductor's
``freezing`` (which could fold the factors' quantization into constants). Per call
inside a CUDA graph and eagerly, T = 8192, one process; errors against float64.

    python3 lowrank_fp8_compile_probe.py --out $OUT/lowrank_fp8_compile_probe
    python3 lowrank_fp8_compile_probe.py --report lowrank_fp8_compile_probe.jsonl
"""

from __future__ import annotations

import json
import os

import torch
from layerzip_lowrank.module import LowRankLinear
from torch import nn

from lowrank_cases import make_case
from probe_runs import probe_main, report_tables

#: LAYERZIP_PROFILE=1 also prints each compiled block's kernels and their GPU µs per call
PROFILE = os.environ.get("LAYERZIP_PROFILE") == "1"
CASES = [(8192, 4096, 4096, 256), (8192, 4096, 4096, 512), (8192, 4096, 4096, 1024),
         (8192, 4096, 11008, 256), (8192, 4096, 11008, 512)]


def block(n, m, r, u, v, b, backend):
    layer = LowRankLinear(m, n, r, bias=True, backend=backend, dtype=torch.bfloat16,
                          device="cuda")
    with torch.no_grad():
        layer.u.copy_(u), layer.v.copy_(v), layer.bias.copy_(b)
    return nn.Sequential(nn.RMSNorm(n, eps=1e-6), layer).cuda().to(torch.bfloat16).eval()


def compiled(model, freezing: bool):
    """``model`` compiled whole, with or without inductor's freezing, by its first call. That
    call starts from a reset dynamo: dynamo does not guard on inductor's config, and a block of
    the same structure compiled before would serve this one too (in this probe's first run,
    the frozen builds ran the plain builds' code). Time a build before the next one compiles."""
    import torch._dynamo
    import torch._inductor.config as inductor

    compiled_model = torch.compile(model, fullgraph=True)
    first = [True]

    def run(x):
        if first[0]:
            torch._dynamo.reset()
            first[0] = False
        with inductor.patch({"freezing": freezing}):
            return compiled_model(x)
    return run


def probe_case(t, n, m, r, record) -> None:
    x, _, u, v, _ = make_case(t, n, m, r, torch.bfloat16, "cuda")
    b = torch.randn(m, device="cuda", dtype=torch.bfloat16) * 0.1
    bf16, fp8 = block(n, m, r, u, v, b, "torch"), block(n, m, r, u, v, b, "fp8")
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)  # weight 1, eps 1e-6
    ref = (normed @ v.double()) @ u.double().t() + b.double()
    case = (t, n, m, r)
    record(case, "norm → bf16 low-rank, eager", lambda: bf16(x), ref)
    record(case, "norm → fp8 low-rank, eager", lambda: fp8(x), ref)
    # each build on its own instance, timed (and profiled) before the next one compiles
    builds = {"bf16": ("norm → bf16 low-rank, compiled", compiled(bf16, False)),
              "fp8": ("norm → fp8 low-rank, compiled", compiled(fp8, False)),
              "fp8, freezing": ("norm → fp8 low-rank, compiled, freezing",
                                compiled(block(n, m, r, u, v, b, "fp8"), True))}
    for name, (entry, run) in builds.items():
        record(case, entry, lambda run=run: run(x), ref)
        if PROFILE:
            from lowrank_llama_profile import kernel_times

            times = kernel_times(lambda run=run: run(x))
            print(json.dumps({"case": case, "kernels of the compiled block": name,
                              "us": {k[:80]: round(us, 1) for k, us in sorted(
                                  times.items(), key=lambda kv: -kv[1])}}), flush=True)


def report(path: str) -> str:
    """The tables, with each fp8 entry's GPU speedup over bf16 compiled the same way."""
    def vs_bf16(case, rows, what, row):
        base = what.replace("fp8", "bf16").replace(", freezing", "")
        ref = rows.get(base, {}).get("graph_ms")
        if "fp8" not in what or not isinstance(ref, float):
            return [""]
        return [f"{ref / row['graph_ms']:.2f}×"]
    return report_tables(path, ["fp8 vs bf16 (GPU)"], vs_bf16)


if __name__ == "__main__":
    with torch.no_grad():
        probe_main(CASES, probe_case, report)
