"""Backends for op ``lowrank_matmul``: ``y = (x @ v) @ uᵀ + bias`` with u (m×r), v (n×r).

``torch`` is the plain reference; ``compile`` is torch.compile of it; ``fp8`` runs both GEMMs in
float8 e4m3 with per-row scales on Hopper/Ada GPUs (fp8_kernel.py); ``tensorrt`` needs
torch_tensorrt; ``triton`` (triton_kernel.py) fuses the two GEMMs and the bias into one kernel;
``splitk`` and ``triton_decode`` (decode_kernel.py) are for a few rows.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from layerzip import Backend, MeasuredBackend, TritonKernelBackend, WeightCache

OP = "lowrank_matmul"


def lowrank_matmul_reference(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(F.linear(x, v.t()), u, bias)


class TorchBackend(Backend):
    op = OP
    name = "torch"
    priority = 0
    reference = True
    description = "two torch GEMMs (eager); always available, differentiable"

    def __call__(self, x, u, v, bias):
        return lowrank_matmul_reference(x, u, v, bias)


class CompileBackend(Backend):
    op = OP
    name = "compile"
    # Opt-in only (backend: compile): compiling per layer shape costs seconds each on first use,
    # which 'auto' must not impose on a whole-model compress; compile the model instead.
    priority = -10
    description = "torch.compile of the two-GEMM forward (inductor); opt-in"

    def available(self):
        if not hasattr(torch, "compile"):
            return False, "this torch has no torch.compile"
        return True, ""

    @functools.cached_property
    def _compiled(self):
        return torch.compile(lowrank_matmul_reference, dynamic=True)

    def supports(self, x):
        # A module already being traced by an outer torch.compile calls the plain function.
        return not torch.compiler.is_compiling()

    def __call__(self, x, u, v, bias):
        return self._compiled(x, u, v, bias)


def _fp8_available() -> tuple[bool, str]:
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} lacks float8_e4m3fn/_scaled_mm"
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU of compute capability ≥ 8.9 (none found)"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return False, f"needs compute capability ≥ 8.9, this GPU has {cap[0]}.{cap[1]}"
    return True, ""


def _quantize_factors(u: Tensor, v: Tensor):
    from .fp8_kernel import quantize_factors  # imports triton: only when fp8 is used

    return quantize_factors(u, v)


class FP8Backend(Backend):
    """Both GEMMs in float8 e4m3 (see fp8_kernel.py): x and h quantized per row by a Triton
    kernel, the factors once per row of vᵀ and of u (cached until they change), the GEMMs by
    ``torch._scaled_mm`` with bias fused and bf16/fp16 output. Under torch.compile the same
    scheme in torch ops, so that inductor fuses x's quantization into the op before. Inference
    only: with autograd recording, the module falls back to the reference."""

    op = OP
    name = "fp8"
    priority = 20
    differentiable = False
    lossy = True  # ≈ 5% relative error: 'autotune' never picks it, only a name does
    description = "float8 e4m3 GEMMs with per-row scales (CUDA cc ≥ 8.9), inference only"

    def available(self):
        ok, why = _fp8_available()
        if ok and importlib.util.find_spec("triton") is None:
            return False, "needs triton for its quantization kernel (pip install triton)"
        return ok, why

    def supports(self, x):
        if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
            return False
        return x.shape[-1] % 16 == 0

    def __init__(self):
        # quantized once per version of (u, v); the entry goes with the layer's u
        self._cache = WeightCache(_quantize_factors)

    def factors(self, u: Tensor, v: Tensor):
        """The quantized factors of (u, v), computed once per version of the pair."""
        return self._cache(u, v)

    def __call__(self, x, u, v, bias):
        from .fp8_kernel import fp8_lowrank, fp8_lowrank_traceable

        if torch.compiler.is_compiling():
            # the cache and the Triton launch cannot be traced; the same scheme in torch ops
            # can, and lets inductor fuse x's quantization into the op that produced x
            return fp8_lowrank_traceable(x, u, v, bias)
        return fp8_lowrank(x, self.factors(u, v), bias)


class SplitKBackend(Backend):
    """For few rows (decode): the first GEMM's reduction over n is split into S chunks run as
    one batched GEMM, so reading V keeps many SMs busy instead of the handful a (T×n)·(n×r)
    product with T, r small gets; the partial products are summed in fp32."""

    op = OP
    name = "splitk"
    priority = -5  # 'autotune' measures it; plain 'auto' keeps the reference
    description = "split-K first GEMM for few rows (decode); falls back above 64 rows"
    max_rows = 64

    @staticmethod
    def splits(n: int) -> int:
        s = 32
        while s > 1 and (n % s or n // s < 64):
            s //= 2
        return s

    def supports(self, x):
        return x.numel() // max(x.shape[-1], 1) <= self.max_rows and self.splits(x.shape[-1]) > 1

    def __call__(self, x, u, v, bias):
        n, r = v.shape
        s = self.splits(n)
        if s == 1 or not v.is_contiguous():
            return lowrank_matmul_reference(x, u, v, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n)
        parts = torch.bmm(x2.view(-1, s, n // s).transpose(0, 1), v.view(s, n // s, r))
        h = parts.sum(0, dtype=torch.float32).to(x.dtype)
        return F.linear(h, u, bias).reshape(*lead, u.shape[0])


class TensorRTBackend(Backend):
    op = OP
    name = "tensorrt"
    priority = 15
    differentiable = False
    description = "torch.compile(backend='tensorrt') of the forward (needs torch_tensorrt)"

    def available(self):
        if importlib.util.find_spec("torch_tensorrt") is None:
            return False, "torch_tensorrt is not installed (pip install torch-tensorrt)"
        if not torch.cuda.is_available():
            return False, "TensorRT needs a CUDA GPU (none found)"
        return True, ""

    def supports(self, x):
        return x.device.type == "cuda" and not torch.compiler.is_compiling()

    @functools.cached_property
    def _compiled(self):
        import torch_tensorrt  # noqa: F401  (registers the 'tensorrt' compile backend)

        return torch.compile(lowrank_matmul_reference, backend="tensorrt", dynamic=False)

    def __call__(self, x, u, v, bias):
        return self._compiled(x, u, v, bias)


class TritonBackend(TritonKernelBackend):
    """One fused Triton kernel for both GEMMs and the bias (see triton_kernel.py)."""

    op = OP
    name = "triton"
    gpu_priority = 10
    description = "fused two-GEMM Triton kernel, T×r intermediate kept in L2; inference only"
    compile_safe = True  # under torch.compile the kernel runs as a custom op (ops.py)

    def supports(self, x):
        return super().supports(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)

    def __call__(self, x, u, v, bias):
        if torch.compiler.is_compiling():
            from .ops import fused

            return fused(x, u, v, bias)
        from .triton_kernel import lowrank_fused

        return lowrank_fused(x, u, v, bias)


class TritonDecodeBackend(TritonKernelBackend):
    """Decode (≤ 64 rows): one persistent Triton launch, split-K first GEMM with atomics into an
    fp32 h in L2, a grid barrier, then the second GEMM over all SMs (see decode_kernel.py)."""

    op = OP
    name = "triton_decode"
    gpu_priority = -5  # 'autotune' measures it against the others; plain 'auto' keeps torch
    description = "persistent split-K Triton kernel for ≤ 64 rows (decode), one launch; " \
                  "inference only"
    compile_safe = True  # under torch.compile the kernel runs as a custom op (ops.py)

    def supports(self, x):
        from .decode_kernel import MAX_ROWS

        return super().supports(x) and x.dtype in (torch.float16, torch.bfloat16) and \
            x.numel() // max(x.shape[-1], 1) <= MAX_ROWS

    def __call__(self, x, u, v, bias):
        if torch.compiler.is_compiling():
            from .ops import decode

            return decode(x, u, v, bias)
        from .decode_kernel import lowrank_decode

        return lowrank_decode(x, u, v, bias)


class LowRankMeasuredBackend(MeasuredBackend):
    """``autotune``: the fastest available low-rank kernel per (device, dtype, T bucket, m, n,
    r, bias), measured once (torch.compile and TensorRT are not measured: their first call
    compiles for minutes)."""

    op = OP
    skip = ("compile", "tensorrt")

    def shape_key(self, x, u, v, bias):
        return tuple(u.shape), tuple(v.shape), bias is not None
