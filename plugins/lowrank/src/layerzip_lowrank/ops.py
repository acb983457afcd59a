"""The low-rank Triton kernels as torch.library custom ops, so that torch.compile calls them.

Dynamo cannot trace into a Triton launch made through Python (LaunchCache, per-device scratch,
autotuning); as custom ops with fake (shape-only) implementations the kernels are opaque nodes
of the compiled graph, and a compiled decode step keeps the one-launch decode kernel instead
of falling back to the two-GEMM reference. Both are inference only, like the kernels, so no
autograd is registered: the backends decline calls that need gradients before reaching here.
Eager calls do not go through these ops (the dispatcher adds host time to a call that is
host-bound already); the backends use them only while compiling.

``decode`` is functional from the outside although the kernel keeps per-stream scratch (h and
an arrival counter): every call leaves the scratch ready for the next (with the default two
h, the h the next call uses is zeroed; with ``hbuf`` = 1, the one h is) and the counter only
grows, so calls commute with everything else in the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decode_kernel import lowrank_decode
from .triton_kernel import lowrank_fused


def _out_shaped(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """The fake (shape-only) implementation of both ops: y has x's leading dimensions and u's
    rows."""
    return x.new_empty((*x.shape[:-1], u.shape[0]))


@torch.library.custom_op("layerzip_lowrank::decode", mutates_args=())
def decode(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """y = (x v) uᵀ + bias for at most 64 rows: the persistent one-launch decode kernel."""
    return lowrank_decode(x, u, v, bias)


@torch.library.custom_op("layerzip_lowrank::fused", mutates_args=())
def fused(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """y = (x v) uᵀ + bias in one fused Triton launch (the ``triton`` backend)."""
    return lowrank_fused(x, u, v, bias)


decode.register_fake(_out_shaped)
fused.register_fake(_out_shaped)
