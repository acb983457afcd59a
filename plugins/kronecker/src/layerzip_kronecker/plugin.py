"""Entry point of layerzip-kronecker."""

from __future__ import annotations

import layerzip
from layerzip import Backend

from .method import Kronecker
from .module import OP, kron_matmul_reference


class TorchKronBackend(Backend):
    op = OP
    name = "torch"
    reference = True
    description = "vec trick with batched torch matmuls + gather/scatter residual; differentiable"

    def __call__(self, x, a, b, res_idx, res_val, bias):
        return kron_matmul_reference(x, a, b, res_idx, res_val, bias)


@layerzip.hookimpl
def register_approximators(register):
    register(Kronecker())


@layerzip.hookimpl
def register_backends(register):
    register(TorchKronBackend())
