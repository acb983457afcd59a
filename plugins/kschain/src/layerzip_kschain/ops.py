"""The KS-factor kernels as torch.library custom ops, so that torch.compile calls them.

Dynamo cannot trace into a Triton launch made through Python (LaunchCache, autotuning); as
custom ops with fake (shape-only) implementations the kernels are opaque nodes of the compiled
graph, and ``register_autograd`` gives the compiled backward the same kernels as eager: dX is
the transposed factor, dW the split-token reduction. Eager calls do not go through these ops
(the dispatcher adds host time per call): ``ks_chain_triton`` uses them only while compiling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .patterns import Pattern
from .triton_kernel import factor_forward, factor_weight_grad


def _out_shape(x: Tensor, rows: int, batch_last: bool) -> tuple[int, int]:
    t = x.shape[1] if batch_last else x.shape[0]
    return (rows, t) if batch_last else (t, rows)


@torch.library.custom_op("layerzip_kschain::factor", mutates_args=())
def factor(x: Tensor, w: Tensor, pattern: list[int], batch_last: bool) -> Tensor:
    """y = K x for one factor with blocks ``w`` (a·d, b, c) and ``pattern`` [a, b, c, d]."""
    return factor_forward(x.contiguous(), w.contiguous(), Pattern(*pattern), batch_last)


@factor.register_fake
def _(x, w, pattern, batch_last):
    a, b, _, d = pattern
    return x.new_empty(_out_shape(x, a * b * d, batch_last))


@torch.library.custom_op("layerzip_kschain::factor_transposed", mutates_args=())
def factor_transposed(g: Tensor, w: Tensor, pattern: list[int], batch_last: bool) -> Tensor:
    """Kᵀ g: the input gradient of :func:`factor`."""
    return factor_forward(g.contiguous(), w.contiguous(), Pattern(*pattern), batch_last,
                          transpose=True)


@factor_transposed.register_fake
def _(g, w, pattern, batch_last):
    a, _, c, d = pattern
    return g.new_empty(_out_shape(g, a * c * d, batch_last))


@torch.library.custom_op("layerzip_kschain::factor_weight_grad", mutates_args=())
def weight_grad(x: Tensor, g: Tensor, pattern: list[int], batch_last: bool) -> Tensor:
    """dW (a·d, b, c) in float32: the weight gradient of :func:`factor`."""
    return factor_weight_grad(x.contiguous(), g.contiguous(), Pattern(*pattern), batch_last)


@weight_grad.register_fake
def _(x, g, pattern, batch_last):
    a, b, c, d = pattern
    return x.new_empty((a * d, b, c), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, w, pattern, batch_last = inputs
    ctx.save_for_backward(x, w)
    ctx.pattern, ctx.batch_last = pattern, batch_last


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = factor_transposed(grad, w, ctx.pattern, ctx.batch_last)
    if ctx.needs_input_grad[1]:
        dw = weight_grad(x, grad, ctx.pattern, ctx.batch_last).to(w.dtype)
    return dx, dw, None, None


factor.register_autograd(_backward, setup_context=_setup_context)
