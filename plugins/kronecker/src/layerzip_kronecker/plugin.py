"""Entry point of layerzip-kronecker."""

from __future__ import annotations

import torch

import layerzip
from layerzip import Backend, MeasuredBackend, TritonKernelBackend

from .method import Kronecker
from .module import OP, add_residual_and_bias, kron_matmul_reference


class TorchKronBackend(Backend):
    op = OP
    name = "torch"
    reference = True
    description = "vec trick with batched torch matmuls + gather/scatter residual; differentiable"

    def __call__(self, x, a, b, res_idx, res_val, bias):
        return kron_matmul_reference(x, a, b, res_idx, res_val, bias)


class TritonKronBackend(TritonKernelBackend):
    """The fused Triton kernel (triton_kernel.py). When no gradient is needed a residual of
    whole blocks goes through a kernel of its own (add_block_residual_) in place on the fresh
    y, and one of whole columns is computed first — y = x[:, columns] valuesᵀ + bias, an
    index_select and one cuBLAS product — and the Kronecker kernel adds its product to it, so
    y is read once more instead of read and written
    (benchmarks/results/kronecker_column_probe.md).
    Otherwise — and a residual of single entries always — the torch form adds it (cuSPARSE
    CSR for single entries: a Triton gather kernel lost to it,
    benchmarks/results/kronecker_entry_residual.md)."""

    op = OP
    name = "triton"
    # above torch on a GPU: faster at every measured shape (benchmarks/results/kronecker_gpu.md)
    gpu_priority = 10
    differentiable = True  # backward: the same kernel for dX, one more kernel for dA and dB
    description = "tiled persistent Triton kernel: x read once, Σ Aₖ X Bₖᵀ as two tensor-core " \
                  "dots per token tile, y written once; differentiable (in-kernel dA, dB)"

    def __call__(self, x, a, b, res_idx, res_val, bias):
        from .triton_kernel import add_block_residual_, kron_fused, kron_fused_autograd

        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        structured = res_idx is not None and res_idx.numel() > 0 and res_val.dim() > 1
        if structured and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, a, b, res_val, bias))):
            # tensor-core products, in place; with gradients, the differentiable torch form
            if res_val.dim() == 3:  # blocks
                y = add_block_residual_(kron_fused(x2, a, b), x2.contiguous(), res_idx,
                                        res_val)
                return add_residual_and_bias(y, x2, None, None, bias).reshape(*lead, -1)
            # columns: the residual's product (and the bias) first, written by cuBLAS; the
            # kernel adds its own to it
            xc = x2.index_select(1, res_idx.long())
            vt = res_val.to(x2.dtype).t()
            y = torch.addmm(bias.to(x2.dtype), xc, vt) if bias is not None else xc @ vt
            return kron_fused(x2, a, b, out=y).reshape(*lead, -1)
        y = kron_fused_autograd(x2, a, b)
        return add_residual_and_bias(y, x2, res_idx, res_val, bias).reshape(*lead, -1)


class KronMeasuredBackend(MeasuredBackend):
    """``autotune``: the fastest available kron_matmul kernel per (device, dtype, T bucket,
    factor shapes, residual structure or none, bias or not), measured once — what ``auto``
    picks on a GPU."""

    op = OP

    def shape_key(self, x, a, b, res_idx, res_val, bias):
        # the residual's structure (0: none, 1: entries, 2: columns, 3: blocks) moves the choice
        return (tuple(a.shape), tuple(b.shape),
                res_val.dim() if res_idx is not None and res_idx.numel() > 0 else 0,
                bias is not None)


@layerzip.hookimpl
def register_approximators(register):
    register(Kronecker())


@layerzip.hookimpl
def register_backends(register):
    register(TorchKronBackend())
    register(TritonKronBackend())
    register(KronMeasuredBackend())
