"""End to end through a whole transformers model: a LLaMA-7B-shaped ``LlamaForCausalLM`` (hidden
4096, MLP 11008, 32 heads, 4 layers, vocabulary 32000; random bf16 weights — speed only, no
accuracy claim), dense against low-rank at rank 256 (layerzip.compress + rsvd, backend ``auto``),
with what test_lowrank_model.py's projection stack leaves out: attention over a KV cache,
RMSNorm, rotary embeddings, the embedding and the LM head.

- **prefill**: one sequence of 8192 tokens, the logits of its last token only (what generation
  computes), eager, and torch.compile'd (inductor fuses the norms, rotary embeddings, gating and
  residual adds that eager runs as separate passes over the activations) in a CUDA graph;
  ``compile_causal`` the same with attention told it is causal instead of given a mask, which
  a compiled transformers model builds on torch < 2.14 (llama_cases.causal_attention).
- **decode**: one step of 16 sequences, a token each, against a static KV cache holding
  ``CONTEXT`` tokens — eager, and as a user would run it: torch.compile(fullgraph=True) captured
  in a CUDA graph (what mode="reduce-overhead" runs; captured by layerzip.bench.graphed as in
  test_lowrank_model.py), with inductor's dependent launches off and on.

``scope``: ``blocks`` compresses the seven projections of every layer (what a spec like the
shipped default targets), ``all`` the LM head as well (4096→32000 at rank 256). Reported beside
the speedup: the weight bytes of both models, and the ratio of their linear layers' FLOPs per
token (attention's are not counted)."""

import contextlib

import pytest
import torch

from layerzip.bench import pedantic, time_callable

from llama_cases import (BATCH, CONTEXT, PREFILL, SCOPES, VOCAB, causal_attention, compressed,
                         decode_step, last_logits_only, llama, model_sizes)
from lowrank_cases import autotune_graph_timings, compiled_and_captured


CASES = [("prefill", "blocks", mode) for mode in ("eager", "compile", "compile_causal")] + [
    ("decode", scope, mode) for scope in SCOPES for mode in ("eager", "compile", "compile_pdl")]


@pytest.fixture(scope="module")
def dense_model():
    return llama()


@pytest.mark.gpu
@pytest.mark.parametrize("phase,scope,mode", CASES,
                         ids=[f"{p}-{s}-{m}" for p, s, m in CASES])
def test_llama(benchmark, dense_model, phase, scope, mode):
    dense = dense_model
    low = compressed(dense, scope)
    with causal_attention(dense, low) if mode == "compile_causal" else contextlib.nullcontext():
        run_case(benchmark, dense, low, phase, scope, mode)
    del low
    torch.cuda.empty_cache()


def run_case(benchmark, dense, low, phase, scope, mode):
    if phase == "prefill":
        ids = torch.randint(0, VOCAB, (1, PREFILL), device="cuda")
        keep = last_logits_only(dense)

        def forward(model):  # called with no argument, or with the compiled model
            return lambda m=model: m(input_ids=ids, use_cache=False, **keep).logits
        fd, fl = forward(dense), forward(low)
    else:
        fd, fl = decode_step(dense), decode_step(low)
    with torch.no_grad():
        eager = fl()  # autotune measures here, before any capture or compile
    benchmark.extra_info["autotune_graph_us"] = autotune_graph_timings(
        PREFILL if phase == "prefill" else BATCH)
    with torch.no_grad():
        if mode.startswith("compile"):
            fd, fl = compiled_and_captured(mode, dense, low, fd, fl, eager, benchmark)
        td = time_callable(fd, rounds=30, warmup=5)
        tl = time_callable(fl, rounds=30, warmup=5)
        pedantic(benchmark, fl, rounds=10)
    tokens = PREFILL if phase == "prefill" else BATCH
    benchmark.extra_info.update({"tokens": tokens, "backend": "auto", "scope": scope,
                                 "graphs": mode != "eager", "mode": mode,
                                 "context": CONTEXT if phase == "decode" else 0,
                                 "dense_ms": td.median * 1e3, "lowrank_ms": tl.median * 1e3,
                                 "speedup": td.median / tl.median,
                                 **model_sizes(dense, low)})
