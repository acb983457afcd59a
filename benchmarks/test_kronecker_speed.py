"""Kronecker layer (plugin layerzip-kronecker; backends torch and triton) vs the dense layer of
the materialized W, same process."""

import pytest
import torch

import layerzip
from layerzip.bench import pedantic, time_callable
from layerzip_kronecker.module import kron_matmul_reference

CASES = [  # (T, (m1, n1), (m2, n2), rank, residual fraction)
    (8192, (64, 64), (64, 64), 1, 0.0),
    (8192, (64, 64), (64, 64), 4, 0.0),
    (8192, (64, 64), (64, 64), 1, 0.01),
    (8192, (48, 24), (64, 32), 1, 0.0),   # GPT-2 c_fc: 3072×768
    (8192, (32, 24), (48, 24), 1, 0.0),   # SmolLM2 gate/up: 1536×576
]


def build(t, f1, f2, r, frac, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    (m1, n1), (m2, n2) = f1, f2
    m, n = m1 * m2, n1 * n2
    a = torch.randn(r, m1, n1, generator=g).to(device, dtype)
    b = torch.randn(r, m2, n2, generator=g).to(device, dtype)
    nnz = int(frac * m * n)
    idx = torch.randperm(m * n, generator=g)[:nnz].sort().values.to(device, torch.int32)
    val = torch.randn(nnz, generator=g).to(device, dtype)
    x = torch.randn(t, n, generator=g).to(device, dtype)
    w = torch.einsum("kij,kab->iajb", a.float(), b.float()).reshape(m, n)
    if nnz:
        w.view(-1).index_add_(0, idx.long(), val.float())
    return x, a, b, idx, val, w.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_{}x{}_r{}_res{}".format(
    c[0], c[1][0] * c[2][0], c[1][1] * c[2][1], c[3], c[4]))
def test_kron_forward(benchmark, case, backend):
    t, f1, f2, r, frac = case
    x, a, b, idx, val, w = build(t, f1, f2, r, frac, "cuda", torch.bfloat16)
    be = layerzip.get_backend("kron_matmul", backend)
    with torch.no_grad():
        be(x, a, b, idx, val, None)  # autotune outside the timing
        dense = time_callable(lambda: x @ w.t(), rounds=30, warmup=5)
        kron = time_callable(lambda: be(x, a, b, idx, val, None), rounds=30, warmup=5)
        ref = x.double() @ w.double().t()
        out = be(x, a, b, idx, val, None).double()
        pedantic(benchmark, lambda: be(x, a, b, idx, val, None), rounds=10)
    m, n = w.shape
    (m1, n1), (m2, _) = f1, f2
    flops = r * 2 * t * (n * m2 + m1 * n1 * m2) + 2 * t * idx.numel()
    benchmark.extra_info.update({
        "T": t, "n": n, "m": m, "r": r, "residual_fraction": frac, "backend": backend,
        "dense_ms": dense.median * 1e3, "lowrank_ms": kron.median * 1e3,
        "speedup": dense.median / kron.median, "flop_ratio": 2 * t * m * n / flops,
        "kernel_rel_error": float((out - ref).norm() / ref.norm())})


def test_cpu_smoke(benchmark):
    x, a, b, idx, val, w = build(32, (8, 8), (8, 8), 2, 0.01, "cpu", torch.float32)
    out = kron_matmul_reference(x, a, b, idx, val, None)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-4, atol=1e-3)
    pedantic(benchmark, lambda: kron_matmul_reference(x, a, b, idx, val, None), rounds=3,
             warmup=1)
