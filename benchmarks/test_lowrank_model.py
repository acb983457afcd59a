"""End to end: a LLaMA-7B-shaped stack of decoder projections (q, k, v, o: 4096→4096; gate, up:
4096→11008; down: 11008→4096; SiLU gating; random bf16 weights — speed only, no accuracy claim),
every linear dense vs low-rank (rank 256, compressed with layerzip.compress + rsvd), prefill
(T=8192) and a decode step (T=16), eager and CUDA-graph captured. The decode step is also timed
as a user would run it: torch.compile of both stacks (inductor fuses the elementwise ops; the
low-rank kernels are custom ops in its graph), captured in a CUDA graph as
mode="reduce-overhead" would (captured here by layerzip.bench.graphed, so that the GPU's time is
measured as in the "graphs" rows, without the host time of torch's graph bookkeeping), with
inductor's programmatic dependent launches off and on — on, its elementwise kernels let the next
kernel start early, which is what the decode kernel's weight prefetch needs to overlap them."""

import pytest
import torch
from torch import nn

import layerzip
from layerzip.bench import graphed, pedantic, time_callable

from lowrank_cases import autotune_graph_timings, compiled_and_captured


HIDDEN, INTER, BLOCKS = 4096, 11008, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))
        self.gate = nn.Linear(HIDDEN, INTER, bias=False)
        self.up = nn.Linear(HIDDEN, INTER, bias=False)
        self.down = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        # attention's softmax/mixing is left out on purpose: only the weight-heavy part is timed
        x = x + self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def stack():
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(BLOCKS)]).cuda().bfloat16().eval()


# triton_decode takes at most 64 rows, so it is only paired with the decode step; compiled
# runs only for the decode step (prefill is two large GEMMs per layer either way) and for the
# backends a decode user would pick ('auto' is autotune on a GPU: measured eagerly first)
STACK_CASES = [(tokens, backend, mode) for tokens in (8192, 16)
               for backend in ("torch", "triton", "triton_decode", "auto")
               for mode in ("eager", "graphs", "compile", "compile_pdl")
               if not (backend == "triton_decode" and tokens > 64)
               and not (backend == "auto" and mode in ("eager", "graphs"))
               and not (mode.startswith("compile") and (tokens > 64 or backend == "triton"))]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,backend,mode", STACK_CASES, ids=[
    f"{'prefill' if t > 64 else 'decode'}{t}-{b}-{mode}" for t, b, mode in STACK_CASES])
def test_projection_stack(benchmark, backend, mode, tokens):
    dense = stack()
    low = stack()
    layerzip.compress(low, {"rules": [{"targets": ["Linear"], "method": "rsvd",
                                       "params": {"rank": 256}, "backend": backend}]},
                      progress=False)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = low(x)  # autotune measures here, before any capture or compile
    if backend == "auto":
        benchmark.extra_info["autotune_graph_us"] = autotune_graph_timings(tokens)
    with torch.no_grad():
        fd, fl = (lambda: dense(x)), (lambda: low(x))
        if mode == "graphs":
            fd, fl = graphed(fd), graphed(fl)
        elif mode.startswith("compile"):
            fd, fl = compiled_and_captured(mode, dense, low, lambda m: m(x), lambda m: m(x),
                                           eager, benchmark)
        td = time_callable(fd, rounds=30, warmup=5)
        tl = time_callable(fl, rounds=30, warmup=5)
        pedantic(benchmark, fl, rounds=10)
    benchmark.extra_info.update({"tokens": tokens, "backend": backend,
                                 "graphs": mode != "eager", "mode": mode,
                                 "dense_ms": td.median * 1e3, "lowrank_ms": tl.median * 1e3,
                                 "speedup": td.median / tl.median,
                                 "flop_ratio": (4 * HIDDEN ** 2 + 3 * HIDDEN * INTER) /
                                               (256 * (8 * HIDDEN + 3 * (HIDDEN + INTER)))})
