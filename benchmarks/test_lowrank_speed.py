"""Low-rank forward vs the dense layer of the same shape, same process (issue targets in the
README). GPU cases skip without CUDA; the CPU case keeps the suite from rotting in CI."""

import pytest
import torch

import layerzip
from layerzip.bench import pedantic

from lowrank_cases import autotune_choices, make_case, measure

PREFILL = [(8192, 4096, 4096, r) for r in (128, 256, 512, 1024)] + \
          [(8192, 4096, 11008, r) for r in (256, 512)]
DECODE = [(16, 4096, 4096, 256), (16, 4096, 11008, 256), (1, 4096, 11008, 256)]


def record(benchmark, result):
    benchmark.extra_info.update(result)


# the fused triton kernel is slower than torch at every prefill shape: timed eagerly only
PREFILL_RUNS = [(b, g) for b in ("torch", "triton", "fp8", "autotune") for g in (False, True)
                if not (b == "triton" and g)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,graphs", PREFILL_RUNS,
                         ids=[f"{b}-{'graphs' if g else 'eager'}" for b, g in PREFILL_RUNS])
@pytest.mark.parametrize("shape", PREFILL, ids=lambda s: "T{}_{}x{}_r{}".format(*s))
def test_prefill(benchmark, backend, shape, graphs):
    """Eager (what a plain forward costs, host launches included: the fp8 path's four launches
    show there) and per call inside a CUDA graph (the GPU's time; steady where eager timings
    moved with the host between runs)."""
    ok, why = layerzip.get_registry().backends[("lowrank_matmul", backend)][0].available()
    if not ok:
        pytest.skip(why)
    t, n, m, r = shape
    result = measure(backend, t, n, m, r, graphs=graphs)
    be = layerzip.get_backend("lowrank_matmul", backend)
    x, _, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
    with torch.no_grad():
        pedantic(benchmark, lambda: be(x, u, v, b), rounds=20)
    record(benchmark, result)
    if backend == "autotune":
        benchmark.extra_info["autotune_us"] = autotune_choices(t, m, n, r)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("backend", ["torch", "triton", "splitk", "triton_decode"])
@pytest.mark.parametrize("shape", DECODE, ids=lambda s: "T{}_{}x{}_r{}".format(*s))
def test_decode(benchmark, backend, graphs, shape):
    t, n, m, r = shape
    result = measure(backend, t, n, m, r, graphs=graphs, rounds=200)
    be = layerzip.get_backend("lowrank_matmul", backend)
    x, _, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
    with torch.no_grad():
        pedantic(benchmark, lambda: be(x, u, v, b), rounds=50)
    record(benchmark, result)


@pytest.mark.parametrize("rank", [16, 64])
def test_cpu_smoke(benchmark, rank):
    """A small CPU case: same measurement path, float32, torch backend."""
    result = measure("torch", 64, 256, 256, rank, dtype=torch.float32, device="cpu", rounds=5)
    assert result["kernel_rel_error"] < 1e-5
    be = layerzip.get_backend("lowrank_matmul", "torch")
    x, _, u, v, b = make_case(64, 256, 256, rank, torch.float32, "cpu")
    pedantic(benchmark, lambda: be(x, u, v, b), rounds=5, warmup=1)
    record(benchmark, result)
