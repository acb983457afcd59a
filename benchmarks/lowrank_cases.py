"""Shared builders for the low-rank speed cases: theoretical ratios and the timed callables."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import layerzip
from layerzip.bench import graphed, time_callable


def ratios(t: int, n: int, m: int, r: int, elem: int = 2) -> dict:
    """FLOP ratio dense/low-rank, and byte ratio (x read, y written, weights read once; the
    unfused two-GEMM path also writes and reads the T×r intermediate, which we do not count:
    it is the floor of the fused kernel)."""
    flops_dense, flops_lr = 2 * t * n * m, 2 * t * r * (n + m)
    bytes_dense = elem * (t * n + t * m + n * m)
    bytes_lr = elem * (t * n + t * m + r * (n + m))
    return {"flop_ratio": flops_dense / flops_lr, "byte_ratio": bytes_dense / bytes_lr,
            "flops_executed": flops_lr, "param_reduction": 1 - r * (n + m) / (n * m)}


def make_case(t, n, m, r, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(t, n, generator=g).to(device, dtype)
    w = (torch.randn(m, n, generator=g) / n ** 0.5).to(device, dtype)
    u = (torch.randn(m, r, generator=g) / r ** 0.5).to(device, dtype)
    v = (torch.randn(n, r, generator=g) / n ** 0.5).to(device, dtype)
    b = torch.zeros(m).to(device, dtype)
    return x, w, u, v, b


def kernel_error(backend, x, u, v, b) -> float:
    ref = (x.double() @ v.double()) @ u.double().t() + b.double()
    out = backend(x, u, v, b).double()
    return float((out - ref).norm() / ref.norm())


def measure(backend_name: str, t, n, m, r, dtype=torch.bfloat16, device="cuda",
            graphs: bool = False, rounds: int = 30) -> dict:
    """Time dense F.linear and the low-rank backend on the same inputs, same process."""
    backend = layerzip.get_backend("lowrank_matmul", backend_name)
    x, w, u, v, b = make_case(t, n, m, r, dtype, device)
    with torch.no_grad():
        dense_fn = lambda: F.linear(x, w, b)  # noqa: E731
        lr_fn = lambda: backend(x, u, v, b)  # noqa: E731
        lr_fn()  # compile / autotune outside the timing
        if graphs:
            dense_fn, lr_fn = graphed(dense_fn), graphed(lr_fn)
        dense = time_callable(dense_fn, rounds=rounds, warmup=5)
        low = time_callable(lr_fn, rounds=rounds, warmup=5)
        err = kernel_error(backend, x, u, v, b)
    out = {"T": t, "n": n, "m": m, "r": r, "dtype": str(dtype).removeprefix("torch."),
           "backend": backend_name, "graphs": graphs, "dense_ms": dense.median * 1e3,
           "lowrank_ms": low.median * 1e3, "speedup": dense.median / low.median,
           "kernel_rel_error": err, **ratios(t, n, m, r, torch.empty(0, dtype=dtype).element_size())}
    out["efficiency_flops"] = out["speedup"] / out["flop_ratio"]
    out["efficiency_bytes"] = out["speedup"] / out["byte_ratio"]
    out["lowrank_tflops"] = out["flops_executed"] / low.median / 1e12
    out["dense_tflops"] = 2 * t * n * m / dense.median / 1e12
    return out
