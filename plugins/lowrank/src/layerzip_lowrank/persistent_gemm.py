"""A persistent Triton GEMM, C = A B (+ bias), for the two products of the low-rank forward at
many rows (prefill): h = x V, then y = h Uᵀ + b.

Why not cuBLAS: the second product has a short reduction (K = r, 256–1024) and a large output
(T × m). Each output tile then spends about as long writing C as multiplying, and cuBLAS's
kernels for these shapes write a tile's C before starting the next tile's loads (measured on the
H100: 573 TFLOP/s at T = 8192, 512 → 4096, where the same library reaches 790 on the dense
layer). Here one program per SM walks its tiles in a flattened loop, so the pipeliner issues the
next tile's loads while the current tile's results are stored; with ``USE_TMA`` the tiles move
through the Hopper tensor-memory accelerator (device-side descriptors; the global scratch they
need comes from torch's allocator).

B is given either as K × N (``B_NK = False``, V of the first product) or as N × K (``B_NK =
True``, U of the second). The configuration (tile shape, pipeline depth, TMA or plain loads) is
chosen by Triton's autotuner per (M bucket, N, K, layout). Tested against torch on CPU with
TRITON_INTERPRET=1, plain loads and TMA descriptors both.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

from layerzip import LaunchCache, cdiv, triton_interpreted

from .triton_kernel import _next_pow2

INTERPRET = triton_interpreted()


def _configs():
    def config(bm, bn, bk, tma, warps=8, stages=3):
        return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "USE_TMA": tma},
                             num_warps=warps, num_stages=stages)

    if INTERPRET:  # one small config (the interpreter cannot time): tests pick the load path
        return [triton.Config({"BM": 16, "BN": 32, "BK": 16, "GROUP_M": 2, "USE_TMA": True},
                              num_warps=1)]
    if os.environ.get("LAYERZIP_TRITON_QUICK") == "1":
        return [config(128, 128, 64, False), config(128, 128, 64, True)]
    out = []
    for tma in (False, True):
        for bm, bn, bk, warps, stages in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                                          (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
                                          (64, 256, 64, 4, 4), (128, 128, 128, 8, 3),
                                          (256, 128, 64, 8, 3)):
            out.append(config(bm, bn, bk, tma, warps, stages))
    return out


if triton is not None:

    @triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "B_NK", "TMA_OK"])
    @triton.jit
    def _persistent_gemm_kernel(
        a_ptr, b_ptr, c_ptr, bias_ptr,
        M, N, K, M_BUCKET,
        sam, sak, sb0, sb1, scm, scn,
        HAS_BIAS: tl.constexpr, B_NK: tl.constexpr, TMA_OK: tl.constexpr,
        NUM_SMS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        USE_TMA: tl.constexpr,
    ):
        tma: tl.constexpr = USE_TMA and TMA_OK
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(N, BN)
        n_k = tl.cdiv(K, BK)
        per_group = GROUP_M * n_n
        if tma:
            a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[sam, 1],
                                               block_shape=[BM, BK])
            if B_NK:
                b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[sb0, 1],
                                                   block_shape=[BN, BK])
            else:
                b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[sb0, 1],
                                                   block_shape=[BK, BN])
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[scm, 1],
                                               block_shape=[BM, BN])
        # flattened: the pipeliner overlaps the next tile's loads with this tile's stores
        for tile in tl.range(tl.program_id(0), n_m * n_n, NUM_SMS, flatten=True):
            # grouped order: programs running together share rows of A and columns of B in L2
            first_m = (tile // per_group) * GROUP_M
            size_m = tl.minimum(n_m - first_m, GROUP_M)
            pid_m = first_m + (tile % per_group) % size_m
            pid_n = (tile % per_group) // size_m
            rows = pid_m * BM + tl.arange(0, BM)
            cols = pid_n * BN + tl.arange(0, BN)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(n_k):
                ks = kk * BK + tl.arange(0, BK)
                if tma:
                    a = a_desc.load([pid_m * BM, kk * BK])
                    if B_NK:
                        b = b_desc.load([pid_n * BN, kk * BK]).T
                    else:
                        b = b_desc.load([kk * BK, pid_n * BN])
                else:
                    a = tl.load(a_ptr + rows[:, None] * sam + ks[None, :] * sak,
                                mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
                    if B_NK:  # element (k, n) of B is at n·sb0 + k·sb1
                        b = tl.load(b_ptr + cols[None, :] * sb0 + ks[:, None] * sb1,
                                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
                    else:     # element (k, n) at k·sb0 + n·sb1
                        b = tl.load(b_ptr + ks[:, None] * sb0 + cols[None, :] * sb1,
                                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
                acc = tl.dot(a, b, acc)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            out = acc.to(c_ptr.dtype.element_ty)
            if tma:
                c_desc.store([pid_m * BM, pid_n * BN], out)
            else:
                tl.store(c_ptr + rows[:, None] * scm + cols[None, :] * scn, out,
                         mask=(rows[:, None] < M) & (cols[None, :] < N))

    _GEMM = LaunchCache(_persistent_gemm_kernel)


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # the interpreter: a few programs exercise the persistent loop


@functools.lru_cache(maxsize=None)
def _tma_capable(device: torch.device) -> bool:
    if INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_layout_ok(*ts: torch.Tensor) -> bool:
    """TMA needs a unit inner stride and 16-byte aligned rows and base addresses."""
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in ts)


_allocator_set = False


def _ensure_allocator() -> None:
    """Device-side TMA descriptors live in a small global scratch that Triton asks its allocator
    for at launch. Install torch's (CUDA-graph safe) unless the application set one."""
    global _allocator_set
    if _allocator_set:
        return
    current = None
    try:  # Triton keeps the allocator in a private ContextVar; only read it
        from triton.runtime._allocation import _NULL_ALLOCATOR, _allocator
        current = _allocator.get()
        unset = current is _NULL_ALLOCATOR
    except ImportError:  # pragma: no cover - other Triton layouts
        unset = True
    if unset:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(
            size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu"))
    _allocator_set = True


def persistent_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
                      b_nk: bool, tma: bool | None = None) -> torch.Tensor:
    """a (M × K) @ B (+ bias over columns), where B is b (K × N) or, with ``b_nk``, bᵀ for b
    (N × K). Output in a's dtype. ``tma=False`` keeps to plain loads (default: TMA allowed
    where the GPU and the layouts permit; the autotuner then picks)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    m, k = a.shape
    n = b.shape[0] if b_nk else b.shape[1]
    c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    g = _programs(a.device)
    tma_ok = tma is not False and _tma_capable(a.device) and _tma_layout_ok(a, b, c)
    if tma_ok:
        _ensure_allocator()

    def grid(meta):
        return (min(g, cdiv(m, meta["BM"]) * cdiv(n, meta["BN"])),)

    _GEMM(grid, a, b, c, bias if bias is not None else c, m, n, k, _next_pow2(m),
          a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
          HAS_BIAS=bias is not None, B_NK=b_nk, TMA_OK=tma_ok, NUM_SMS=g)
    return c


def lowrank_persistent(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x @ v) @ uᵀ + bias as two persistent GEMM launches."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    h = persistent_matmul(x2, v, b_nk=False)
    y = persistent_matmul(h, u, bias, b_nk=True)
    return y.reshape(*lead, u.shape[0])
