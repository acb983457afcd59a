"""Shared builders for the low-rank speed cases: theoretical ratios and the timed callables."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import layerzip
from layerzip.bench import distinct_copies, graph_time, graphed, time_callable, wake_gpu


def weight_copies(*tensors: torch.Tensor, device=None) -> list[tuple[torch.Tensor, ...]]:
    """``tensors`` and enough clones of them that calls taking the copies in turn read them
    from device memory, not from the L2 cache the previous calls filled, at least two
    (``layerzip.bench.distinct_copies``): [(t1, t2, …), (clone of t1, clone of t2, …), …]."""
    return distinct_copies(tensors, device, at_least=2)


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


def probe_inputs(t, n, m, r, device="cuda"):
    """bf16 x, w, u, v and a non-zero bias for the probes, with the float64 references of
    h = x v and of y = h uᵀ + b."""
    x, w, u, v, _ = make_case(t, n, m, r, torch.bfloat16, device)
    b = torch.randn(m, device=device, dtype=torch.bfloat16) * 0.1
    ref_h = x.double() @ v.double()
    return x, w, u, v, b, ref_h, ref_h @ u.double().t() + b.double()


def kernel_error(backend, x, u, v, b) -> float:
    ref = (x.double() @ v.double()) @ u.double().t() + b.double()
    out = backend(x, u, v, b).double()
    return float((out - ref).norm() / ref.norm())


def measure(backend_name: str, t, n, m, r, dtype=torch.bfloat16, device="cuda",
            graphs: bool = False, rounds: int = 30) -> dict:
    """Time dense F.linear and the low-rank backend on the same inputs, same process.

    ``graphs``: both sides run as a CUDA graph of calls over distinct weight copies (as layers
    of a captured model step: weights come from memory, launches from the graph), per call;
    the single-call graph times, whose replay launch dominates at decode sizes, are recorded
    beside them (``*_single_graph_ms``)."""
    backend = layerzip.get_backend("lowrank_matmul", backend_name)
    x, w, u, v, b = make_case(t, n, m, r, dtype, device)
    extra = {}
    with torch.no_grad():
        dense_fn = lambda: F.linear(x, w, b)  # noqa: E731
        lr_fn = lambda: backend(x, u, v, b)  # noqa: E731
        lr_fn()  # compile / autotune outside the timing
        wake_gpu()
        if graphs:
            dense_single = time_callable(graphed(dense_fn), rounds=rounds, warmup=5)
            low_single = time_callable(graphed(lr_fn), rounds=rounds, warmup=5)
            ws = [w_ for (w_,) in weight_copies(w, device=device)]
            uvs = weight_copies(u, v, device=device)
            k_dense, k_low = len(ws), len(uvs)
            dense = graph_time([lambda w=w_: F.linear(x, w, b) for w_ in ws], rounds=rounds)
            low = graph_time([lambda u=u_, v=v_: backend(x, u, v, b) for u_, v_ in uvs],
                             rounds=rounds)
            extra = {"dense_single_graph_ms": dense_single.median * 1e3,
                     "lowrank_single_graph_ms": low_single.median * 1e3,
                     "dense_weight_copies": k_dense, "lowrank_weight_copies": k_low,
                     "dense_calls_per_replay": dense.calls_per_round,
                     "lowrank_calls_per_replay": low.calls_per_round}
            del ws, uvs
        else:
            dense = time_callable(dense_fn, rounds=rounds, warmup=5)
            low = time_callable(lr_fn, rounds=rounds, warmup=5)
        err = kernel_error(backend, x, u, v, b)
    out = {"T": t, "n": n, "m": m, "r": r, "dtype": str(dtype).removeprefix("torch."),
           "backend": backend_name, "graphs": graphs, "dense_ms": dense.median * 1e3,
           "lowrank_ms": low.median * 1e3, "speedup": dense.median / low.median,
           "kernel_rel_error": err, **extra,
           **ratios(t, n, m, r, torch.empty(0, dtype=dtype).element_size())}
    out["efficiency_flops"] = out["speedup"] / out["flop_ratio"]
    out["efficiency_bytes"] = out["speedup"] / out["byte_ratio"]
    out["lowrank_tflops"] = out["flops_executed"] / low.median / 1e12
    out["dense_tflops"] = 2 * t * n * m / dense.median / 1e12
    return out


def compiled(pdl: bool, *models):
    """([torch.compile(m, fullgraph=True) for m in models], settings): compiled afresh (no
    recompile limit across cases); their first calls compile and must run inside ``settings``
    (inductor's enable_pdl)."""
    import torch._dynamo
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    has_pdl = hasattr(inductor.triton, "enable_pdl")
    if pdl and not has_pdl:  # torch older than the device's 2.11: nothing to measure
        pytest.skip(f"torch {torch.__version__}'s inductor has no enable_pdl")
    settings = inductor.patch({"triton.enable_pdl": pdl}) if has_pdl \
        else contextlib.nullcontext()
    return [torch.compile(m, fullgraph=True) for m in models], settings


def compiled_and_captured(mode: str, dense, low, run_dense, run_low, eager_low, benchmark):
    """Both models torch.compile'd (with inductor's dependent launches for mode
    "compile_pdl"), compiled by a first call, then captured in CUDA graphs as
    mode="reduce-overhead" runs them: (dense replay, low-rank replay). ``run_*(model)`` runs
    one step of that model. The compiled low-rank output must match ``eager_low`` (its eager
    self) within 2%; the error goes into the benchmark's record."""
    (cd, cl), settings = compiled(mode == "compile_pdl", dense, low)
    with settings:
        run_dense(cd), run_low(cl)  # compile
    out = run_low(cl).float()
    err = float((out - eager_low.float()).norm() / eager_low.float().norm())
    assert err < 2e-2, f"the compiled low-rank model is off by {err:.1e}"
    benchmark.extra_info["compiled_rel_error"] = err
    return graphed(lambda: run_dense(cd)), graphed(lambda: run_low(cl))


def autotune_graph_timings(tokens: int) -> dict:
    """For each shape autotune measured at this many tokens (gradients or not, u's shape,
    v's, bias or not): its choice for graphs and every candidate's µs per call in a graph
    (None: not capturable), so a run's `auto` figure can be traced to its choices."""
    auto = layerzip.get_backend("lowrank_matmul", "autotune")
    return {str(shape): {"choice": seen["graph_choice"],
                         **{name: None if g is None else g * 1e6
                            for name, (_, g) in seen["seconds"].items()}}
            for shape, seen in auto.measured_at(tokens).items()}


def autotune_choices(tokens: int, m: int, n: int, r: int) -> dict:
    """What autotune measured for the layer m × n of rank r at this many tokens: its eager
    choice and its choice for graphs, and every candidate's µs per call [eager, in a graph]
    (None: not capturable) — why the `autotune` rows of a run are what they are."""
    auto = layerzip.get_backend("lowrank_matmul", "autotune")
    return {str(shape[1:]): {
                "choice": seen["choice"], "graph_choice": seen["graph_choice"],
                **{name: [e * 1e6, None if g is None else g * 1e6]
                   for name, (e, g) in seen["seconds"].items()}}
            for shape, seen in auto.measured_at(tokens).items()
            if shape[1:3] == ((m, r), (n, r))}
