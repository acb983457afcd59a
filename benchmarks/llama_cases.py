"""The LLaMA-7B-shaped transformers model of the end-to-end benchmarks (test_lowrank_llama.py,
lowrank_llama_profile.py): building it, a repeatable decode step over a static KV cache, its
low-rank copy, and what compression changed in it. Random bf16 weights: speed only."""


import contextlib
import copy

import torch

import layerzip

HIDDEN, INTER, LAYERS, HEADS, VOCAB, RANK = 4096, 11008, 4, 32, 32000, 256
PREFILL, BATCH, CONTEXT = 8192, 16, 256
SCOPES = {"blocks": ["model.layers.*_proj"], "all": ["model.layers.*_proj", "lm_head"]}


def llama(hidden=HIDDEN, inter=INTER, layers=LAYERS, heads=HEADS, vocab=VOCAB, device="cuda"):
    """A randomly initialised LlamaForCausalLM in bf16, eval mode, with SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=2 * PREFILL, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def static_cache(model, batch: int, length: int):
    """A StaticCache of ``length`` positions (its signature changed in transformers 4.56: the
    newer one sizes batch, device and dtype from the first update)."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except TypeError:
        p = next(model.parameters())
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length,
                           device=p.device, dtype=p.dtype)


def decode_step(model, batch=BATCH, context=CONTEXT, vocab=VOCAB):
    """A callable running one decode step of ``batch`` sequences (logits out) after ``context``
    tokens were prefilled into a static cache. Every call writes the same cache position, so
    repeated calls do the same work and return the same logits."""
    dev = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(1)
    cache = static_cache(model, batch, context + 16)  # a multiple of 16 past the context
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(dev)
    step = torch.randint(0, vocab, (batch, 1), generator=g).to(dev)
    pos = torch.tensor([context], device=dev)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(context,
              device=dev), use_cache=True)

    # transformers ≥ 5 keeps each layer's fill level on the device and appends at it,
    # whatever cache_position says: put it back, or every call would move one position on
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", ())
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def run(m=model):
        for counter in counters:
            counter.fill_(context)
        return m(input_ids=step, past_key_values=cache, cache_position=pos,
                 use_cache=True).logits
    return run


def last_logits_only(model) -> dict:
    """The forward's keyword for computing the last position's logits only (renamed in
    transformers 4.50), or {} where it has none."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def compressed(dense, scope: str, rank=RANK):
    """A deep copy of ``dense`` with the linears of ``scope`` low-rank (backend auto)."""
    low = copy.deepcopy(dense)
    layerzip.compress(low, {"rules": [{"targets": SCOPES[scope], "method": "rsvd",
                                       "params": {"rank": rank}, "backend": "auto"}]},
                      progress=False)
    return low


def model_sizes(dense, low) -> dict:
    """Weight bytes of both models, and the ratio of their linear layers' FLOPs per token."""
    from layerzip_lowrank.module import LowRankLinear

    def linear_flops(model):
        total = 0
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                total += 2 * mod.in_features * mod.out_features
            elif isinstance(mod, LowRankLinear):
                total += 2 * mod.rank * (mod.in_features + mod.out_features)
        return total

    def nbytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return {"dense_weight_gb": nbytes(dense) / 1e9, "lowrank_weight_gb": nbytes(low) / 1e9,
            "linear_flop_ratio": linear_flops(dense) / linear_flops(low)}


CAUSAL = "layerzip_causal_prefill"


@contextlib.contextmanager
def causal_attention(*models):
    """The models' attention as SDPA told ``is_causal=True``, with no mask built: right for
    one unpadded sequence on an empty cache only, so it refuses queries and keys of different
    lengths. transformers decides to skip the causal mask by reading values that torch < 2.14's
    dynamo hides from it (transformers' masking_utils says so), so a compiled prefill builds and
    passes an explicit 8192 × 8192 mask. This measures what that costs."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] != key.shape[2]:
            raise ValueError(f"{CAUSAL} serves unpadded prefill only: {query.shape[2]} "
                             f"queries against {key.shape[2]} keys")
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True,
                                      **kwargs)

    AttentionInterface.register(CAUSAL, attention)
    AttentionMaskInterface.register(CAUSAL, lambda *args, **kwargs: None)
    before = [m.config._attn_implementation for m in models]
    for m in models:
        m.set_attn_implementation(CAUSAL)
    try:
        yield
    finally:
        for m, name in zip(models, before):
            m.set_attn_implementation(name)
