"""Kronecker layer (plugin layerzip-kronecker; backends torch and triton) vs the dense layer of
the materialized W, same process."""

import pytest
import torch

import layerzip
from layerzip.bench import graphed, host_time, pedantic, time_callable
from layerzip_kronecker.module import kron_matmul_reference

CASES = [  # (T, (m1, n1), (m2, n2), rank, residual fraction[, residual structure])
    (8192, (64, 64), (64, 64), 1, 0.0),
    (8192, (64, 64), (64, 64), 4, 0.0),
    (8192, (64, 64), (64, 64), 1, 0.01),
    (8192, (64, 64), (64, 64), 1, 0.01, "blocks"),  # 40 of the 4096 64×64 blocks
    (8192, (64, 64), (64, 64), 1, 0.01, "columns"),  # 40 of the 4096 input columns
    (8192, (48, 24), (64, 32), 1, 0.0),   # GPT-2 c_fc: 3072×768
    (8192, (32, 24), (48, 24), 1, 0.0),   # SmolLM2 gate/up: 1536×576
]


def build(t, f1, f2, r, frac, device, dtype, seed=0, structure="entries"):
    g = torch.Generator().manual_seed(seed)
    (m1, n1), (m2, n2) = f1, f2
    m, n = m1 * m2, n1 * n2
    a = torch.randn(r, m1, n1, generator=g).to(device, dtype)
    b = torch.randn(r, m2, n2, generator=g).to(device, dtype)
    x = torch.randn(t, n, generator=g).to(device, dtype)
    w = torch.einsum("kij,kab->iajb", a.float(), b.float()).reshape(m, n)
    if structure == "blocks":  # block p·n1 + q = rows p·m2…, columns q·n2…
        nb = int(frac * m * n / (m2 * n2))
        idx = torch.randperm(m1 * n1, generator=g)[:nb].sort().values.to(device, torch.int32)
        val = torch.randn(nb, m2, n2, generator=g).to(device, dtype)
        for blk, v in zip(idx.tolist(), val.float()):
            p, q = divmod(blk, n1)
            w[p * m2:(p + 1) * m2, q * n2:(q + 1) * n2] += v
        return x, a, b, idx, val, w.to(dtype)
    if structure == "columns":  # whole input columns: x[:, idx] valᵀ
        k = int(frac * n)
        idx = torch.randperm(n, generator=g)[:k].sort().values.to(device, torch.int32)
        val = torch.randn(m, k, generator=g).to(device, dtype)
        w[:, idx.long()] += val.float()
        return x, a, b, idx, val, w.to(dtype)
    nnz = int(frac * m * n)
    idx = torch.randperm(m * n, generator=g)[:nnz].sort().values.to(device, torch.int32)
    val = torch.randn(nnz, generator=g).to(device, dtype)
    if nnz:
        w.view(-1).index_add_(0, idx.long(), val.float())
    return x, a, b, idx, val, w.to(dtype)


def _case_id(c):
    return "T{}_{}x{}_r{}_res{}{}".format(c[0], c[1][0] * c[2][0], c[1][1] * c[2][1], c[3], c[4],
                                          f"_{c[5]}" if c[5:] else "")


def _graph_time(fn, benchmark, rounds=30):
    """fn's median time replayed from a CUDA graph, or None with the capture error recorded in
    the results (a path that cannot be captured is a finding, not a reason to lose the case)."""
    try:
        replay = graphed(fn)
    except RuntimeError as e:
        benchmark.extra_info["graph_error"] = str(e).splitlines()[0][:200]
        return None
    return time_callable(replay, rounds=rounds, warmup=3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kron_forward(benchmark, case, backend):
    t, f1, f2, r, frac = case[:5]
    structure = case[5] if len(case) > 5 else "entries"
    x, a, b, idx, val, w = build(t, f1, f2, r, frac, "cuda", torch.bfloat16,
                                 structure=structure)
    be = layerzip.get_backend("kron_matmul", backend)
    with torch.no_grad():
        be(x, a, b, idx, val, None)  # autotune outside the timing
        dense = time_callable(lambda: x @ w.t(), rounds=30, warmup=5)
        kron = time_callable(lambda: be(x, a, b, idx, val, None), rounds=30, warmup=5)
        # the GPU's time without launch overhead, and the host's time per call: an eager
        # time near the host time is bound by Python, not by the kernel
        g_dense = time_callable(graphed(lambda: x @ w.t()), rounds=30, warmup=3)
        g_kron = _graph_time(lambda: be(x, a, b, idx, val, None), benchmark)
        host = host_time(lambda: be(x, a, b, idx, val, None))
        ref = x.double() @ w.double().t()
        out = be(x, a, b, idx, val, None).double()
        pedantic(benchmark, lambda: be(x, a, b, idx, val, None), rounds=10)
    m, n = w.shape
    (m1, n1), (m2, _) = f1, f2
    flops = r * 2 * t * (n * m2 + m1 * n1 * m2) + 2 * t * val.numel()
    benchmark.extra_info.update({
        "T": t, "n": n, "m": m, "r": r, "residual_fraction": frac, "backend": backend,
        "residual_structure": structure if frac else None,
        "dense_ms": dense.median * 1e3, "lowrank_ms": kron.median * 1e3,
        "speedup": dense.median / kron.median, "flop_ratio": 2 * t * m * n / flops,
        "graph_dense_ms": g_dense.median * 1e3, "host_us": host * 1e6,
        **({"graph_kron_ms": g_kron.median * 1e3, "graph_speedup": g_dense.median / g_kron.median}
           if g_kron else {}),
        "kernel_rel_error": float((out - ref).norm() / ref.norm())})
    if backend == "triton":  # the autotuner's pick, to read the results by
        from layerzip_kronecker.triton_kernel import _kron_fwd

        benchmark.extra_info["config"] = str(_kron_fwd.best_config)


BACKWARD_CASES = [c for c in CASES if c[4] == 0.0][:3]  # r=1, r=4, GPT-2 shape


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: "T{}_{}x{}_r{}".format(
    c[0], c[1][0] * c[2][0], c[1][1] * c[2][1], c[3]))
def test_kron_backward(benchmark, case, backend):
    """Training step cost: forward + backward (gradients for x and every weight) against the
    dense layer's (dX = dY W, dW = dYᵀ X), and the backward alone (the difference)."""
    t, f1, f2, r, frac = case
    x, a, b, idx, val, w = build(t, f1, f2, r, frac, "cuda", torch.bfloat16)
    be = layerzip.get_backend("kron_matmul", backend)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    w.requires_grad_(True)
    dy = torch.randn(t, w.shape[0], device="cuda", dtype=torch.bfloat16)

    def dense_step():
        return torch.autograd.grad(x @ w.t(), (x, w), dy)

    def kron_step():
        return torch.autograd.grad(be(x, a, b, None, None, None), (x, a, b), dy)

    kron_step()  # autotune outside the timing
    with torch.no_grad():
        dense_fwd = time_callable(lambda: x @ w.t(), rounds=30, warmup=5)
        kron_fwd = time_callable(lambda: be(x, a, b, None, None, None), rounds=30, warmup=5)
    dense = time_callable(dense_step, rounds=30, warmup=5)
    kron = time_callable(kron_step, rounds=30, warmup=5)
    # without launch overhead (eager, an autograd step of ~0.1 ms is bound by the host)
    with torch.no_grad():
        g_dense_fwd = _graph_time(lambda: x @ w.t(), benchmark)
        g_kron_fwd = _graph_time(lambda: be(x, a, b, None, None, None), benchmark)
    g_dense, g_kron = _graph_time(dense_step, benchmark), _graph_time(kron_step, benchmark)
    # gradients against float64 autograd of the materialized layer
    xd = x.detach().double().requires_grad_(True)
    ad, bd = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    ref = torch.autograd.grad(kron_matmul_reference(xd, ad, bd, None, None, None), (xd, ad, bd),
                              dy.double())
    got = kron_step()
    errs = [float((g.double() - rg).norm() / rg.norm()) for g, rg in zip(got, ref, strict=True)]
    pedantic(benchmark, kron_step, rounds=10)
    dense_bwd, kron_bwd = dense.median - dense_fwd.median, kron.median - kron_fwd.median
    benchmark.extra_info.update({
        "T": t, "n": w.shape[1], "m": w.shape[0], "r": r, "backend": backend,
        "dense_ms": dense.median * 1e3, "lowrank_ms": kron.median * 1e3,
        "speedup": dense.median / kron.median,
        "dense_backward_ms": dense_bwd * 1e3, "kron_backward_ms": kron_bwd * 1e3,
        "backward_speedup": dense_bwd / kron_bwd,
        **({"graph_dense_ms": g_dense.median * 1e3, "graph_kron_ms": g_kron.median * 1e3,
            "graph_speedup": g_dense.median / g_kron.median,
            "graph_backward_speedup": (g_dense.median - g_dense_fwd.median)
            / (g_kron.median - g_kron_fwd.median)}
           if g_dense and g_kron and g_dense_fwd and g_kron_fwd else {}),
        "kernel_rel_error": max(errs)})


def test_cpu_smoke(benchmark):
    x, a, b, idx, val, w = build(32, (8, 8), (8, 8), 2, 0.01, "cpu", torch.float32)
    out = kron_matmul_reference(x, a, b, idx, val, None)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-4, atol=1e-3)
    pedantic(benchmark, lambda: kron_matmul_reference(x, a, b, idx, val, None), rounds=3,
             warmup=1)
