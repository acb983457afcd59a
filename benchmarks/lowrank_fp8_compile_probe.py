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
    """``model`` compiled whole; its first call compiles, with or without inductor's freezing
    (a config dynamo does not guard on: give each setting its own module instance)."""
    import torch._inductor.config as inductor

    compiled_model = torch.compile(model, fullgraph=True)

    def run(x):
        with inductor.patch({"freezing": freezing}):
            return compiled_model(x)
    return run


def probe_case(t, n, m, r, record) -> None:
    import torch._dynamo

    torch._dynamo.reset()  # three compiles per case: stay below dynamo's recompile limit
    x, _, u, v, _ = make_case(t, n, m, r, torch.bfloat16, "cuda")
    b = torch.randn(m, device="cuda", dtype=torch.bfloat16) * 0.1
    bf16, fp8 = block(n, m, r, u, v, b, "torch"), block(n, m, r, u, v, b, "fp8")
    fp8_for_freezing = block(n, m, r, u, v, b, "fp8")
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)  # weight 1, eps 1e-6
    ref = (normed @ v.double()) @ u.double().t() + b.double()
    case = (t, n, m, r)
    bf16_c, fp8_c = compiled(bf16, False), compiled(fp8, False)
    fp8_frozen = compiled(fp8_for_freezing, True)
    record(case, "norm → bf16 low-rank, eager", lambda: bf16(x), ref)
    record(case, "norm → fp8 low-rank, eager", lambda: fp8(x), ref)
    record(case, "norm → bf16 low-rank, compiled", lambda: bf16_c(x), ref)
    record(case, "norm → fp8 low-rank, compiled", lambda: fp8_c(x), ref)
    record(case, "norm → fp8 low-rank, compiled, freezing", lambda: fp8_frozen(x), ref)
    if PROFILE:
        from lowrank_llama_profile import kernel_times

        for name, fn in (("bf16", bf16_c), ("fp8", fp8_c), ("fp8, freezing", fp8_frozen)):
            times = kernel_times(lambda fn=fn: fn(x))
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
