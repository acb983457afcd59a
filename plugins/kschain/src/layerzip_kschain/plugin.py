"""Entry point of layerzip-kschain."""

from __future__ import annotations

import torch

import layerzip
from layerzip import Backend, MeasuredBackend, TritonKernelBackend

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
    compile_safe = True  # under torch.compile the kernels run as custom ops (ops.py)
    # below bmm: `autotune` (what `auto` picks on a GPU) measures which of the two is faster per
    # shape; neither wins everywhere (benchmarks/results/kschain_gpu.md)
    gpu_priority = -10
    description = "Triton tensor-core kernel per factor, forward + backward, both layouts"

    def supports(self, x):
        return super().supports(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)

    def __call__(self, x, factors, patterns, batch_last=False):
        from .triton_kernel import ks_chain_triton

        return ks_chain_triton(x, factors, patterns, batch_last)


class KSMeasuredBackend(MeasuredBackend):
    """``autotune``: bmm or the Triton kernel, whichever a one-time measurement finds faster
    per (device, dtype, token bucket, patterns, layout) — what ``auto`` picks on a GPU. Neither
    wins everywhere: cuBLAS's batched GEMM beats the kernel batch-last with d = 1 and large
    blocks ((64,256,256,1): 0.19 vs 0.26 ms, benchmarks/results/kschain_gpu.md)."""

    op = OP

    def shape_key(self, x, factors, patterns, batch_last=False):
        # the core buckets x's leading dimensions as tokens: right batch-first; batch-last
        # keeps tokens in the last dimension, so their bucket is added here
        t = x.shape[-1] if batch_last else 0
        return (tuple(tuple(p.as_list()) for p in patterns), bool(batch_last),
                1 << max(0, (t - 1).bit_length()) if batch_last else 0)


@layerzip.hookimpl
def register_approximators(register):
    register(KSChain())


@layerzip.hookimpl
def register_backends(register):
    register(BmmBackend())
    register(TritonKSBackend())
    register(KSMeasuredBackend())
