"""One pass of forward hooks over calibration batches, gathering per-layer input statistics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .approximator import LayerStats


def call_model(model: nn.Module, batch):
    """Feed one batch: ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple, else
    ``model(batch)``. Tensors are moved to the model's device."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def move(x):
        return x.to(device) if isinstance(x, Tensor) else x

    if isinstance(batch, Mapping):
        return model(**{k: move(v) for k, v in batch.items()})
    if isinstance(batch, tuple):
        return model(*map(move, batch))
    return model(move(batch))


class _Collector:
    def __init__(self, in_features: int, want_gram: bool, max_samples: int, seed: int):
        self.stats = LayerStats()
        self.want_gram = want_gram
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self._keys = {"samples": None, "holdout": None}
        self.in_features = in_features

    def add(self, raw: Tensor, holdout: bool, gram_cache: dict) -> None:
        x = raw.detach().reshape(-1, self.in_features)
        if not holdout and self.want_gram:
            # Layers fed the very same tensor object (q, k, v) share one product per batch. The
            # cache holds the tensor itself, so its memory cannot be reused by another
            # intermediate (and its id by another object) while the entry lives; keying on a
            # data pointer alone handed layers each other's Grams once the allocator reused it.
            hit = gram_cache.get(id(raw))
            if hit is not None and hit[0] is raw:
                g = hit[1]
            else:
                xd = x.to(torch.float64)
                g = xd.t() @ xd
                gram_cache[id(raw)] = (raw, g)
            self.stats.gram = g.cpu().clone() if self.stats.gram is None else \
                self.stats.gram.add_(g.cpu())
        if not holdout:
            self.stats.count += x.shape[0]
        self._sample(x.float().cpu(), "holdout" if holdout else "samples")

    def _sample(self, x: Tensor, slot: str) -> None:
        # Bottom-k sampling: give every row a random key and keep the k smallest, which is a
        # uniform sample without replacement over all rows seen, whatever the batch sizes.
        keys = torch.rand(x.shape[0], generator=self.gen)
        old, old_keys = getattr(self.stats, slot), self._keys[slot]
        if old is not None:
            x, keys = torch.cat([old, x]), torch.cat([old_keys, keys])
        if x.shape[0] > self.max_samples:
            keep = torch.topk(keys, self.max_samples, largest=False).indices
            x, keys = x[keep], keys[keep]
        setattr(self.stats, slot, x)
        self._keys[slot] = keys


@torch.no_grad()
def collect_stats(model: nn.Module, layers, calibration: Iterable,
                  holdout: Iterable | None = None, *, max_samples: int = 512,
                  seed: int = 0) -> dict[str, LayerStats]:
    """Run the calibration (and held-out) batches through ``model`` once, gathering for every
    planned layer: the float64 Gram XᵀX of its inputs (only for layers whose method needs it) and
    a uniform sample of up to ``max_samples`` input rows (held-out rows kept separately)."""
    collectors: dict[str, _Collector] = {}
    handles = []
    state = {"holdout": False, "cache": {}}
    for i, layer in enumerate(layers):
        want = layer.rule.approximator.needs_calibration(layer.rule.params)
        col = collectors[layer.name] = _Collector(layer.view.in_features, want, max_samples,
                                                  seed * 7919 + i)

        def hook(module, args, kwargs, col=col, adapter=layer.adapter):
            col.add(adapter.layer_input(args, kwargs), state["holdout"], state["cache"])

        handles.append(layer.module.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        n = 0
        for batch in calibration:
            call_model(model, batch)
            state["cache"].clear()
            n += 1
        if n == 0:
            raise ValueError("the calibration data is empty: give at least one batch")
        state["holdout"] = True
        for batch in holdout or ():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: c.stats for name, c in collectors.items()}
