"""Kronecker-sparse factors and chains (plugin layerzip-kschain; backends bmm and triton, both
layouts) vs the dense layer of the same size, bf16, same process.

Per factor: b = c ∈ {16, 64, 256}, density 1/(a·d) ∈ {1/2, 1/16, 1/64}, the a·d blocks split as
(a·d, 1), (1, a·d) and (√, √); N = a·b·d; T = 8192 tokens. Forward for every case, forward +
backward for a subset. Whole chain: the 2-factor Monarch-like 4096×4096 chain at ranks 1…16.
Speedups are dense time / kernel time; the kernel error is against a float64 reference.
"""

import math

import pytest
import torch

import layerzip
from layerzip.bench import graph_time as bench_graph_time
from layerzip.bench import host_time, pedantic, time_callable, wake_gpu
from layerzip_kschain import Pattern, chain_matmul_bmm, factor_matmul, rank_chain

T = 8192


def _splits(ad):
    out = [(ad, 1), (1, ad)]
    r = math.isqrt(ad)
    if r * r == ad and r > 1:
        out.append((r, r))
    return out


FACTORS = [Pattern(a, b, b, d) for b in (16, 32, 64, 128, 256) for ad in (2, 4, 16, 64)
           for a, d in _splits(ad)] + [Pattern(512, 2, 2, 4)]  # a dyadic butterfly factor
BACKWARD = [Pattern(a, b, b, d) for b in (64, 256) for a, d in _splits(16)]
IMPLS = ["bmm", "bmm_bs_last", "triton", "triton_bs_last"]
# batch-first variants where 'triton' picks another kernel: triton_2d = the strided 2-D kernel
# (for every d > 1), triton_3d = the batched-dot kernel instead of the split one (d ≥ 4, powers
# of two)
FWD_IMPLS = IMPLS + ["triton_2d", "triton_3d"]


def graph_time(fn, rounds=20):
    """Per-call time of fn repeated inside one CUDA graph: the GPU's time without launch
    overhead (Triton's Python launcher costs tens of µs, which dominates small layers in eager
    mode; a graph of one short call would time its own replay launch instead). The same
    inputs every call: the dense weight (≤ 32 MB here) may stay in L2, which only favours
    dense."""
    return bench_graph_time(fn, rounds=rounds)


def _impl(name):
    be = layerzip.get_backend("ks_matmul", name.removesuffix("_bs_last").removesuffix("_2d")
                             .removesuffix("_3d"))
    return be, name.endswith("_bs_last")


def _inputs(p: Pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(p.num_blocks, p.b, p.c, generator=g) / math.sqrt(p.c)).to("cuda",
                                                                               torch.bfloat16)
    x = torch.randn(T, p.cols, generator=g).to("cuda", torch.bfloat16)
    dense_w = torch.randn(p.rows, p.cols, generator=g).to("cuda", torch.bfloat16)
    return w, x, dense_w


def _pid(p):
    return f"a{p.a}_b{p.b}_c{p.c}_d{p.d}"


def _runs_variant(p: Pattern, impl: str) -> bool:
    from layerzip_kschain import triton_kernel as k

    if impl == "triton_2d":
        return bool(k.split_group(p.d)) or p.d >= k.MIN_D_3D
    if impl == "triton_3d":
        return bool(k.split_group(p.d)) and p.d >= k.MIN_D_3D
    return True


FWD_CASES = [(p, impl) for p in FACTORS for impl in FWD_IMPLS if _runs_variant(p, impl)]


@pytest.mark.gpu
@pytest.mark.parametrize("p, impl", FWD_CASES, ids=lambda v: _pid(v) if isinstance(v, Pattern)
                         else v)
def test_ks_factor_forward(benchmark, p, impl, monkeypatch):
    from layerzip_kschain import triton_kernel

    if impl in ("triton_2d", "triton_3d"):
        monkeypatch.setattr(triton_kernel, "SPLIT_D", ())
    if impl == "triton_2d":
        monkeypatch.setattr(triton_kernel, "MIN_D_3D", 1 << 30)
    w, x, dense_w = _inputs(p)
    be, batch_last = _impl(impl)
    xi = x.t().contiguous() if batch_last else x
    fn = (lambda: be(xi, [w], [p], True)) if batch_last else (lambda: be(xi, [w], [p], False))
    bmm_fn = (lambda: factor_matmul(xi, w, p, True)) if batch_last else \
        (lambda: factor_matmul(x, w, p, False))
    with torch.no_grad():
        out = fn()  # autotune outside the timing
        ref = factor_matmul(xi.double(), w.double(), p, batch_last)
        wake_gpu()  # the clock dropped while the kernel compiled
        dense = time_callable(lambda: x @ dense_w.t(), rounds=20, warmup=5)
        bmm_first = time_callable(lambda: factor_matmul(x, w, p, False), rounds=20, warmup=5)
        kern = time_callable(fn, rounds=20, warmup=5)
        g_dense = graph_time(lambda: x @ dense_w.t())
        g_bmm = graph_time(bmm_fn)  # bmm in the same layout
        g_kern = graph_time(fn)
        host = host_time(fn)
        pedantic(benchmark, fn, rounds=5)
    benchmark.extra_info.update({
        "kind": "factor_forward", "host_us": host * 1e6, "pattern": p.as_list(), "a": p.a,
        "b": p.b, "c": p.c, "d": p.d,
        "density": p.density, "N": p.rows, "T": T, "impl": impl, "dense_ms": dense.median * 1e3,
        "bmm_ms": bmm_first.median * 1e3, "kernel_ms": kern.median * 1e3,
        "speedup_vs_dense": dense.median / kern.median,
        "speedup_vs_bmm": bmm_first.median / kern.median,
        "graph_dense_ms": g_dense.median * 1e3, "graph_bmm_same_layout_ms": g_bmm.median * 1e3,
        "graph_kernel_ms": g_kern.median * 1e3, "graph_calls_per_replay": g_kern.calls_per_round,
        "graph_speedup_vs_dense": g_dense.median / g_kern.median,
        "graph_speedup_vs_bmm_same_layout": g_bmm.median / g_kern.median,
        "tflops": 2 * T * p.nnz / kern.median / 1e12,
        "kernel_rel_error": float((out.double() - ref).norm() / ref.norm())})


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", BACKWARD, ids=_pid)
def test_ks_factor_forward_backward(benchmark, p, impl):
    w, x, dense_w = _inputs(p)
    be, batch_last = _impl(impl)
    xi = (x.t().contiguous() if batch_last else x).requires_grad_(True)
    w = w.requires_grad_(True)
    gy = torch.randn(p.rows, T, device="cuda", dtype=torch.bfloat16)
    gy = gy if batch_last else gy.t().contiguous()
    dense_w.requires_grad_(True)
    x_d = x.detach().requires_grad_(True)
    gd = torch.randn(T, p.rows, device="cuda", dtype=torch.bfloat16)

    # autograd.grad, not .backward(): no accumulation into .grad, so a step is capturable
    def step():
        return torch.autograd.grad(be(xi, [w], [p], batch_last), (xi, w), gy)

    def bmm_step():
        return torch.autograd.grad(factor_matmul(xi, w, p, batch_last), (xi, w), gy)

    def dense_step():
        return torch.autograd.grad(x_d @ dense_w.t(), (x_d, dense_w), gd)

    gx, gw = (g.double() for g in step())
    xr, wr = xi.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    factor_matmul(xr, wr, p, batch_last).backward(gy.double())
    wake_gpu()
    dense = time_callable(dense_step, rounds=15, warmup=3)
    bmm = time_callable(bmm_step, rounds=15, warmup=3)
    kern = time_callable(step, rounds=15, warmup=3)
    # the same steps replayed from CUDA graphs: the GPU's time of a training step (eager, a
    # step of these sizes is mostly the host's autograd and launch time)
    try:
        g_dense, g_bmm, g_kern = (graph_time(f, rounds=15) for f in (dense_step, bmm_step, step))
    except RuntimeError as e:  # a step that cannot be captured is a result, not a lost case
        benchmark.extra_info["graph_error"] = str(e).splitlines()[0][:200]
        g_dense = g_bmm = g_kern = None
    pedantic(benchmark, step, rounds=5)
    benchmark.extra_info.update({
        "kind": "factor_fwd_bwd", "pattern": p.as_list(), "a": p.a, "b": p.b, "c": p.c,
        "d": p.d, "density": p.density, "N": p.rows, "T": T, "impl": impl,
        "dense_ms": dense.median * 1e3, "bmm_ms": bmm.median * 1e3,
        "kernel_ms": kern.median * 1e3, "speedup_vs_dense": dense.median / kern.median,
        "speedup_vs_bmm": bmm.median / kern.median,
        **({"graph_dense_ms": g_dense.median * 1e3, "graph_bmm_ms": g_bmm.median * 1e3,
            "graph_kernel_ms": g_kern.median * 1e3,
            "graph_speedup_vs_dense": g_dense.median / g_kern.median,
            "graph_speedup_vs_bmm_same_layout": g_bmm.median / g_kern.median} if g_kern else {}),
        "grad_x_rel_error": float((gx - xr.grad).norm() / xr.grad.norm()),
        "grad_w_rel_error": float((gw - wr.grad).norm() / wr.grad.norm())})


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["bmm", "triton", "triton_bs_last"])
@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16])
def test_monarch_chain_4096(benchmark, rank, impl):
    pats = rank_chain([64, 64], [64, 64], rank)
    g = torch.Generator().manual_seed(rank)
    fs = [(torch.randn(p.num_blocks, p.b, p.c, generator=g) / math.sqrt(p.c)).to(
        "cuda", torch.bfloat16) for p in pats]
    x = torch.randn(T, 4096, generator=g).to("cuda", torch.bfloat16)
    dense_w = torch.randn(4096, 4096, generator=g).to("cuda", torch.bfloat16)
    be, batch_last = _impl(impl)
    xi = x.t().contiguous() if batch_last else x
    fn = lambda: be(xi, fs, pats, batch_last)  # noqa: E731
    with torch.no_grad():
        out = fn()
        ref = chain_matmul_bmm(xi.double(), [f.double() for f in fs], pats, batch_last)
        wake_gpu()
        dense = time_callable(lambda: x @ dense_w.t(), rounds=20, warmup=5)
        kern = time_callable(fn, rounds=20, warmup=5)
        g_dense = graph_time(lambda: x @ dense_w.t())
        g_kern = graph_time(fn)
        pedantic(benchmark, fn, rounds=5)
    params = sum(p.nnz for p in pats)
    benchmark.extra_info.update({
        "kind": "monarch_chain", "rank": rank, "impl": impl, "T": T, "N": 4096,
        "param_fraction": params / 4096 ** 2, "dense_ms": dense.median * 1e3,
        "kernel_ms": kern.median * 1e3, "speedup_vs_dense": dense.median / kern.median,
        "graph_speedup_vs_dense": g_dense.median / g_kern.median,
        "kernel_rel_error": float((out.double() - ref).norm() / ref.norm())})


def test_cpu_smoke(benchmark):
    pats = rank_chain([4, 8], [8, 4], 2)
    fs = [torch.randn(p.num_blocks, p.b, p.c) for p in pats]
    x = torch.randn(64, 32)
    pedantic(benchmark, lambda: chain_matmul_bmm(x, fs, pats), rounds=3, warmup=1)
