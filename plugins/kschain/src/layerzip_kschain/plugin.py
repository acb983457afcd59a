"""Entry point of layerzip-kschain."""

from __future__ import annotations

import torch

import layerzip
from layerzip import Backend, TritonKernelBackend

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


class TritonKSBackend(TritonKernelBackend):
    """Per factor one Triton kernel reading either layout in place (triton_kernel.py), with its
    own backward kernels (dX on the transposed pattern, dW as a split-token reduction)."""

    op = OP
    name = "triton"
    differentiable = True
    gpu_priority = -10  # opt-in until benchmarks/results/kschain_gpu.md says otherwise
    description = "Triton tensor-core kernel per factor, forward + backward, both layouts"

    def supports(self, x):
        return super().supports(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)

    def __call__(self, x, factors, patterns, batch_last=False):
        from .triton_kernel import ks_chain_triton

        return ks_chain_triton(x, factors, patterns, batch_last)


@layerzip.hookimpl
def register_approximators(register):
    register(KSChain())


@layerzip.hookimpl
def register_backends(register):
    register(BmmBackend())
    register(TritonKSBackend())
