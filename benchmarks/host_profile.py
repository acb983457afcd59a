"""Where the host's time goes in one eager call of each Triton path (GPU only): host µs per
call of the backend call, of the bare LaunchCache launch, of the compiled kernel's own launcher,
and of a torch op for scale, then a cProfile of the backend call (top entries by own time);
and autotune's dispatch in front of the two-GEMM kernel it picks, against that kernel called
directly and the dense F.linear, at prefill and decode sizes.

    python benchmarks/host_profile.py > benchmarks/results/host_profile.txt
"""

from __future__ import annotations

import cProfile
import io
import pstats

import torch
import torch.nn.functional as F

import layerzip
from layerzip.bench import host_time


def _cases():
    from layerzip_kschain import Pattern

    ks = layerzip.get_backend("ks_matmul", "triton")
    p = Pattern(4, 64, 64, 4)
    w = torch.randn(p.num_blocks, p.b, p.c, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8192, p.cols, device="cuda", dtype=torch.bfloat16)
    xt = x.t().contiguous()
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    gy = torch.randn(8192, p.rows, device="cuda", dtype=torch.bfloat16)
    yield "ks_matmul triton, batch-first (4,64,64,4)", lambda: ks(x, [w], [p], False)
    yield "ks_matmul triton, batch-last (4,64,64,4)", lambda: ks(xt, [w], [p], True)
    yield "ks_matmul bmm, batch-first (4,64,64,4)", \
        lambda: layerzip.get_backend("ks_matmul", "bmm")(x, [w], [p], False)
    yield "ks_matmul triton, forward + backward (autograd.grad)", \
        lambda: torch.autograd.grad(ks(xg, [wg], [p], False), (xg, wg), gy)

    kr = layerzip.get_backend("kron_matmul", "triton")
    a = torch.randn(1, 64, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1, 64, 64, device="cuda", dtype=torch.bfloat16)
    xk = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    yield "kron_matmul triton, r=1 64x64 (x) 64x64", lambda: kr(xk, a, b, None, None, None)

    lr = layerzip.get_backend("lowrank_matmul", "triton_decode")
    xd = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    yield "lowrank_matmul triton_decode, T=16 4096x4096 r=256", lambda: lr(xd, u, v, None)

    # autotune's dispatch in front of the kernel it chose: against that kernel called directly
    # (an eager prefill call at r <= 256 is about as long on the host as on the GPU)
    auto, two = (layerzip.get_backend("lowrank_matmul", n) for n in ("autotune", "torch"))
    xp = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    for rows, xx in (("T=8192", xp), ("T=16", xd)):
        yield f"dense F.linear, {rows} 4096x4096", lambda xx=xx: F.linear(xx, w, bias)
        yield f"lowrank_matmul torch, {rows} 4096x4096 r=256", lambda xx=xx: two(xx, u, v, bias)
        yield f"lowrank_matmul autotune, {rows} 4096x4096 r=256", \
            lambda xx=xx: auto(xx, u, v, bias)


def main() -> None:
    with torch.no_grad():
        small = torch.randn(64, 64, device="cuda")
        print(f"torch add (one launch): {host_time(lambda: small.add(1)) * 1e6:.1f} µs/call")
    for name, fn in _cases():
        with torch.enable_grad() if "backward" in name else torch.no_grad():
            fn()
            torch.cuda.synchronize()
            us = host_time(fn, calls=300) * 1e6
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(300):
                fn()
            prof.disable()
            torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        body = out.getvalue()
        body = body[body.find("ncalls"):]
        print(f"\n## {name}: {us:.1f} µs/call (host)\n{body}")


if __name__ == "__main__":
    main()
