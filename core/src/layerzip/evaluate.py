"""Perplexity of a causal LM on token windows."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, windows) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of the windows."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for ids in windows:
            ids = ids.to(next(model.parameters()).device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              target.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += target.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / max(total_tokens, 1))
