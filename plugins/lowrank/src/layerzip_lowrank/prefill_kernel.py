"""The second product of a low-rank prefill, y = h Uᵀ + b, with U's tile held on chip.

At many rows (prefill) the low-rank forward is two GEMMs: h = x V (reduction over the layer's
input, n) and y = h Uᵀ + b (reduction over r only). The second one is where cuBLAS loses most:
on the H100 at T = 8192, r = 256 it runs at ≈ 450 TFLOP/s while writing y at ≈ 1.7 TB/s, half
of either roof (benchmarks/results/lowrank_prefill_probe.md). With K = r short, each output tile
is a few MMAs between loading its operands and storing its result, and the kernel it picks
(nvjet 256×128, cooperative) reloads both operand tiles for every output tile and stores each
tile before starting the next.

Here each program owns a run of output tiles taken in column-major order (so a run crosses
few column blocks) and keeps the column block's U tile (BN × r, all of r at once) in shared
memory while it streams h's row tiles (BM × r, pipelined over STAGES buffers): per output tile
it loads only BM·r of h. Results leave through TMA stores, which drain while the next tile
multiplies. Programs = min(#SMs, #tiles), every program the same number of tiles but the last.

Tensor descriptors (TMA) need 16-byte aligned rows: r, m multiples of 8 for bf16/fp16, and the
whole of r in one box: r ≤ 256 (the box is the next power of two, padded with zeros).
Inference only, bf16/fp16. Tested against the reference on CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

from layerzip import cdiv, triton_interpreted

from .triton_kernel import _next_pow2

INTERPRET = triton_interpreted()
MAX_RANK = 256  # a TMA box holds at most 256 elements per dimension

#: (BM, BN, num_warps, STAGES): what the kernel runs with unless told otherwise
DEFAULT_TILES = (128, 128, 4, 2)

if triton is not None:

    @triton.jit
    def _h_ut_kernel(
        h_desc, u_desc, y_desc, y_ptr, bias_ptr, M, N, syt,
        HAS_BIAS: tl.constexpr, TMA_STORE: tl.constexpr, PROGRAMS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, STAGES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BM)
        total = n_m * tl.cdiv(N, BN)
        per = tl.cdiv(total, PROGRAMS)
        start = pid * per
        end = tl.minimum(start + per, total)
        # column blocks this program's run of tiles touches (tiles are numbered column-major)
        for pn in range(start // n_m, (end - 1) // n_m + 1):
            u = u_desc.load([pn * BN, 0])  # BN × RP, held for every row tile below
            cols = pn * BN + tl.arange(0, BN)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
            lo = tl.maximum(start - pn * n_m, 0)
            hi = tl.minimum(end - pn * n_m, n_m)
            for pm in tl.range(lo, hi, num_stages=STAGES):
                a = h_desc.load([pm * BM, 0])  # BM × RP
                acc = tl.dot(a, u.T)
                if HAS_BIAS:
                    acc += bias[None, :]
                out = acc.to(y_ptr.dtype.element_ty)
                if TMA_STORE:
                    y_desc.store([pm * BM, pn * BN], out)
                else:
                    rows = pm * BM + tl.arange(0, BM)
                    tl.store(y_ptr + rows[:, None] * syt + cols[None, :], out,
                             mask=(rows[:, None] < M) & (cols[None, :] < N))


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # the interpreter: a few programs, so runs cross column blocks


def supported(h: torch.Tensor, u: torch.Tensor) -> tuple[bool, str]:
    """Whether ``h_ut`` can take these operands, and why not."""
    m, r = u.shape
    if h.dtype not in (torch.bfloat16, torch.float16) or u.dtype != h.dtype:
        return False, f"needs bf16/fp16 operands of one dtype, got {h.dtype} and {u.dtype}"
    if r > MAX_RANK:
        return False, f"rank {r} > {MAX_RANK}: all of r must fit one TMA box"
    if r % 8 or m % 8:
        return False, f"r ({r}) and m ({m}) must be multiples of 8 (16-byte aligned TMA rows)"
    return True, ""


def h_ut(h: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, *,
         tiles: tuple[int, int, int, int] | None = None, tma_store: bool = True,
         occupancy: int = 1) -> torch.Tensor:
    """y = h @ uᵀ + bias for a 2-D h (T × r) and u (m × r), bf16/fp16; ``tiles`` = (BM, BN,
    num_warps, STAGES) overrides :data:`DEFAULT_TILES`; ``occupancy`` programs per SM (two
    that fit on one SM interleave one's products with the other's stores)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    ok, why = supported(h, u)
    if not ok:
        raise ValueError(f"h_ut: {why}")
    h = h.contiguous()
    u = u.contiguous()
    t, r = h.shape
    m = u.shape[0]
    bm, bn, warps, stages = tiles or DEFAULT_TILES
    if INTERPRET:  # the interpreter is slow: small tiles, same code
        bm, bn = min(bm, 16), min(bn, 32)
    rp = max(16, _next_pow2(r))
    y = torch.empty((t, m), device=h.device, dtype=h.dtype)
    h_desc = TensorDescriptor.from_tensor(h, [bm, rp])
    u_desc = TensorDescriptor.from_tensor(u, [bn, rp])
    y_desc = TensorDescriptor.from_tensor(y, [bm, bn])
    total = cdiv(t, bm) * cdiv(m, bn)
    per = cdiv(total, min(total, occupancy * _programs(h.device)))
    programs = cdiv(total, per)
    _h_ut_kernel[(programs,)](
        h_desc, u_desc, y_desc, y, bias if bias is not None else y, t, m, y.stride(0),
        HAS_BIAS=bias is not None, TMA_STORE=tma_store, PROGRAMS=programs,
        BM=bm, BN=bn, STAGES=stages, num_warps=warps)
    return y


def lowrank_prefill(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor | None, **kw) -> torch.Tensor:
    """y = (x @ v) @ uᵀ + bias: the first product by torch (cuBLAS), the second by ``h_ut``."""
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1]) @ v
    return h_ut(h, u, bias, **kw).reshape(*lead, u.shape[0])
