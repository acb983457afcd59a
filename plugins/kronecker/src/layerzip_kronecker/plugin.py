"""Entry point of layerzip-kronecker."""

from __future__ import annotations

import torch

import layerzip
from layerzip import (Backend, MeasuredBackend, TritonKernelBackend, WeightCache,
                      graph_capturing)

from .method import Kronecker
from .module import OP, add_residual_and_bias, kron_matmul_reference


class TorchKronBackend(Backend):
    op = OP
    name = "torch"
    reference = True
    description = "vec trick with batched torch matmuls + gather/scatter residual; differentiable"

    def __call__(self, x, a, b, res_idx, res_val, bias):
        return kron_matmul_reference(x, a, b, res_idx, res_val, bias)


def _pack_entries(res_val, res_idx, *, m, n):
    # keyed by res_val (the parameter; res_idx is a buffer beside it)
    from .residual_kernel import pack_entry_residual

    return pack_entry_residual(res_idx, res_val, m, n)


class TritonKronBackend(TritonKernelBackend):
    """The fused Triton kernel (triton_kernel.py); the residual (with the bias) by a kernel of
    its own when no gradient is needed (residual_kernel.py for single entries, packed once
    per version of the residual; add_block_residual_ for blocks), else in differentiable
    torch."""

    op = OP
    name = "triton"
    # above torch on a GPU: faster at every measured shape (benchmarks/results/kronecker_gpu.md)
    gpu_priority = 10
    differentiable = True  # backward: the same kernel for dX, one more kernel for dA and dB
    description = "tiled persistent Triton kernel: x read once, Σ Aₖ X Bₖᵀ as two tensor-core " \
                  "dots per token tile, y written once; differentiable (in-kernel dA, dB)"

    def __init__(self):
        self._packed = WeightCache(_pack_entries)

    def __call__(self, x, a, b, res_idx, res_val, bias):
        from .residual_kernel import add_entry_residual_
        from .triton_kernel import add_block_residual_, kron_fused_autograd

        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = kron_fused_autograd(x2, a, b)
        residual = res_idx is not None and res_idx.numel() > 0
        if residual and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, a, b, res_val, bias))):
            # in place on the fresh y; with gradients, the differentiable torch form below
            if res_val.dim() == 3:  # blocks: a kernel of tensor-core dots
                y = add_block_residual_(y, x2.contiguous(), res_idx, res_val)
                res_idx = res_val = None
            else:  # single entries: gathers from L1, bias fused
                shape = {"m": y.shape[1], "n": x2.shape[1]}
                # packing synchronizes with the host: not while a CUDA graph is captured,
                # where a residual not packed yet takes the (capturable) torch form below
                packed = (self._packed.peek(res_val, res_idx, **shape) if graph_capturing()
                          else self._packed(res_val, res_idx, **shape))
                if packed is not None:
                    y = add_entry_residual_(y, x2, packed, bias)
                    res_idx = res_val = bias = None
        return add_residual_and_bias(y, x2, res_idx, res_val, bias).reshape(*lead, -1)


class KronMeasuredBackend(MeasuredBackend):
    """``autotune``: the fastest available kron_matmul kernel per (device, dtype, T bucket,
    factor shapes, residual or not, bias or not), measured once — what ``auto`` picks on a
    GPU."""

    op = OP

    def shape_key(self, x, a, b, res_idx, res_val, bias):
        return (tuple(a.shape), tuple(b.shape), res_idx is not None and res_idx.numel() > 0,
                bias is not None)


@layerzip.hookimpl
def register_approximators(register):
    register(Kronecker())


@layerzip.hookimpl
def register_backends(register):
    register(TorchKronBackend())
    register(TritonKronBackend())
    register(KronMeasuredBackend())
