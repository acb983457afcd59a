"""Entry point of layerzip-kschain."""

from __future__ import annotations

import layerzip
from layerzip import Backend

from .chain import chain_matmul_bmm
from .method import KSChain
from .module import OP


class BmmBackend(Backend):
    """Reference for ``ks_matmul(x, factors, patterns, batch_last)``: per factor, permute the
    input into a·d batches, torch.bmm with the blocks, permute back. Differentiable."""

    op = OP
    name = "bmm"
    reference = True
    description = "permute → torch.bmm over the a·d blocks → permute, per factor; differentiable"

    def __call__(self, x, factors, patterns, batch_last=False):
        return chain_matmul_bmm(x, factors, patterns, batch_last)


@layerzip.hookimpl
def register_approximators(register):
    register(KSChain())


@layerzip.hookimpl
def register_backends(register):
    register(BmmBackend())
