"""Does holding U's tile on chip beat cuBLAS on the prefill's second product? (GPU diagnostic;
tried in session 11 and not shipped: results/lowrank_stationary_probe.md.)

At T = 8192, r ≤ 256, cuBLAS runs y = h·Uᵀ + b (reduction over r only) at about half of either
roof on the H100: its kernel (nvjet 256×128, cooperative) reloads both operand tiles for every
output tile and stores each tile before starting the next. ``h_ut`` below instead gives each
program a run of output tiles in column-major order; it keeps the column block's U tile
(BN × r, all of r in one TMA box, so r ≤ 256) in shared memory, streams h's row tiles
(BM × r, STAGES buffers) and writes y through TMA stores that drain while the next tile
multiplies (or plain stores). ``h_ut_gluon`` is the same in Gluon (Hopper only, no CPU
interpreter), which also stores tile i − 1 while the tensor cores multiply tile i: ``tl.dot``
waits for its product before the store that follows. ``xv_triton`` is a TMA-loading Triton
first product.

In one process, per case: dense bf16; writing y with ``fill_`` (the bandwidth reference); the
cuBLAS two-GEMM and each GEMM; ``h_ut`` at every tile configuration, with TMA and plain stores
(programs per SM: 1, or 2-3 where they fit); ``h_ut_gluon`` at a few; ``xv_triton`` at a few
tile shapes; cuBLAS x·V followed by the best ``h_ut`` and by the best ``h_ut_gluon``. Each
is timed eagerly (CUDA events, median) and per call inside a CUDA graph (``graph_time``), with
its error against float64. r = 16 has next to no arithmetic: it shows how fast tile stores can
write y. ``--only REGEX`` times only the entries whose names match, ``--cases 0,1`` only those
cases.

    python3 lowrank_stationary_probe.py --out $OUT/lowrank_stationary_probe
    python3 lowrank_stationary_probe.py --report results/lowrank_stationary_probe.jsonl
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor

from layerzip import cdiv
from layerzip_lowrank.backends import lowrank_matmul_reference

from lowrank_cases import probe_inputs
from probe_runs import faster, probe_main, report_tables

# r = 16: next to no arithmetic, so h_ut and cuBLAS show how fast tile stores can write y
CASES = [(8192, 4096, 4096, 256), (8192, 4096, 11008, 256), (8192, 4096, 4096, 128),
         (8192, 4096, 4096, 16)]
# (BM, BN, num_warps, STAGES, programs per SM) for h_ut; shared memory per program =
# STAGES·BM·r + BN·r (+ BM·BN staging), two programs per SM only where twice that fits
HUT_TILES = [(128, 128, 4, 2, 1), (64, 128, 4, 3, 1), (64, 128, 4, 4, 1), (64, 256, 4, 2, 1),
             (128, 64, 4, 2, 1), (64, 64, 4, 4, 1),
             (64, 64, 4, 2, 2), (64, 64, 4, 1, 2), (64, 128, 4, 1, 2), (128, 64, 4, 1, 2),
             (64, 64, 4, 2, 3), (64, 32, 4, 2, 3)]
# (BM, BN, num_warps, STAGES, C_BUFS) for h_ut_gluon; shared memory = STAGES·BM·r + BN·r +
# C_BUFS·BM·BN. BN = 256 halves the reads of h per output (8 warps: two accumulators fit)
HUT_GLUON_TILES = [(64, 128, 4, 4, 2), (64, 128, 4, 3, 2), (64, 256, 8, 2, 1),
                   (64, 128, 8, 4, 2), (64, 256, 8, 1, 2)]
# (BM, BN, BK, num_warps, STAGES) for the Triton x·V
# (two programs per SM where two fit: 128 × 128 at 2-3 stages, 128 × 256 at 2)
XV_TILES = [(64, 256, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 3), (128, 128, 64, 4, 2), (128, 256, 64, 8, 2),
            (64, 128, 64, 4, 3)]


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


def _programs(total: int, device: torch.device, per_sm: int = 1) -> int:
    """Programs of a persistent launch: each takes ⌈total / slots⌉ consecutive tiles, and a
    program left without tiles is not launched (the interpreter: 3 slots a "device")."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 3
    per = cdiv(total, min(total, per_sm * sms))
    return cdiv(total, per)


def h_ut(h, u, bias, *, tiles, tma_store=True, occupancy=1):
    """y = h @ uᵀ + bias (bf16/fp16, r ≤ 256 and a multiple of 8); ``tiles`` = (BM, BN,
    num_warps, STAGES); ``occupancy`` programs per SM."""
    t, r = h.shape
    m = u.shape[0]
    bm, bn, warps, stages = tiles
    rp = max(16, triton.next_power_of_2(r))
    y = torch.empty((t, m), device=h.device, dtype=h.dtype)
    programs = _programs(cdiv(t, bm) * cdiv(m, bn), h.device, occupancy)
    _h_ut_kernel[(programs,)](
        TensorDescriptor.from_tensor(h, [bm, rp]), TensorDescriptor.from_tensor(u, [bn, rp]),
        TensorDescriptor.from_tensor(y, [bm, bn]), y, bias if bias is not None else y, t, m,
        y.stride(0), HAS_BIAS=bias is not None, TMA_STORE=tma_store, PROGRAMS=programs,
        BM=bm, BN=bn, STAGES=stages, num_warps=warps)
    return y


@gluon.jit
def _h_ut_gluon_kernel(h_desc, u_desc, y_desc, bias_ptr, M, N,
                       HAS_BIAS: gl.constexpr, PROGRAMS: gl.constexpr, STAGES: gl.constexpr,
                       C_BUFS: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = y_desc.block_type.shape[0]
    BN: gl.constexpr = y_desc.block_type.shape[1]
    RP: gl.constexpr = h_desc.block_type.shape[1]
    dtype: gl.constexpr = h_desc.dtype
    # warpgroups beyond the first split N (BM = 64 rows is one warpgroup's M)
    WARPS_N: gl.constexpr = num_warps // 4
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, WARPS_N], instr_shape=[16, BN // WARPS_N, 16])
    bias_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)

    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, RP], h_desc.layout)
    u_smem = gl.allocate_shared_memory(dtype, [BN, RP], u_desc.layout)
    c_bufs = gl.allocate_shared_memory(dtype, [C_BUFS, BM, BN], y_desc.layout)
    a_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    u_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(a_bars.index(s), count=1)
    mbarrier.init(u_bar, count=1)

    n_m = gl.cdiv(M, BM)
    total = n_m * gl.cdiv(N, BN)
    per = gl.cdiv(total, PROGRAMS)
    start = gl.program_id(0) * per
    count = min(start + per, total) - start

    # prologue: the first column block's U and the first STAGES tiles of h
    pn_cur = start // n_m
    mbarrier.expect(u_bar, u_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(u_desc, [pn_cur * BN, 0], u_bar, u_smem)
    for s in gl.static_range(STAGES):
        ok = s < count
        mbarrier.expect(a_bars.index(s), h_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(h_desc, [((start + s) % n_m) * BM, 0], a_bars.index(s),
                                        a_bufs.index(s), pred=ok)
    cols = pn_cur * BN + gl.arange(0, BN, layout=bias_layout)
    bias = gl.zeros([BN], gl.float32, bias_layout)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
    mbarrier.wait(u_bar, 0)
    u_phase = 1

    zero = gl.zeros([BM, BN], gl.float32, acc_layout)
    prev = zero
    prev_bias = bias
    prev_m = 0
    prev_n = 0
    for i in range(count):
        t = start + i
        pn = t // n_m
        pm = t % n_m
        if pn != pn_cur:  # a new column block: no product is in flight, so U may be replaced
            mbarrier.expect(u_bar, u_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(u_desc, [pn * BN, 0], u_bar, u_smem)
            cols = pn * BN + gl.arange(0, BN, layout=bias_layout)
            if HAS_BIAS:
                bias = gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
            mbarrier.wait(u_bar, u_phase)
            u_phase ^= 1
            pn_cur = pn
        slot = i % STAGES
        mbarrier.wait(a_bars.index(slot), (i // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(slot), u_smem.permute((1, 0)), zero, use_acc=False,
                            is_async=True)
        # while the tensor cores multiply tile i, store tile i - 1
        if i > 0:
            c = c_bufs.index((i - 1) % C_BUFS)
            tma.store_wait(C_BUFS - 1)  # the store that last read this buffer is done
            c.store((prev + prev_bias[None, :]).to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(y_desc, [prev_m * BM, prev_n * BN], c)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        # tile i's buffer of h is free again: fill it with tile i + STAGES
        nxt = i + STAGES
        ok = nxt < count
        mbarrier.expect(a_bars.index(slot), h_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(h_desc, [((start + nxt) % n_m) * BM, 0],
                                        a_bars.index(slot), a_bufs.index(slot), pred=ok)
        prev = acc
        prev_bias = bias
        prev_m = pm
        prev_n = pn
    if count > 0:
        c = c_bufs.index((count - 1) % C_BUFS)
        tma.store_wait(C_BUFS - 1)
        c.store((prev + prev_bias[None, :]).to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(y_desc, [prev_m * BM, prev_n * BN], c)
    tma.store_wait(0)


def h_ut_gluon(h, u, bias, *, tiles):
    """h_ut in Gluon (Hopper only: no interpreter), storing tile i − 1 while the tensor cores
    multiply tile i; ``tiles`` = (BM, BN, num_warps, STAGES, staging buffers of y)."""
    t, r = h.shape
    m = u.shape[0]
    bm, bn, warps, stages, c_bufs = tiles
    rp = max(16, triton.next_power_of_2(r))
    y = torch.empty((t, m), device=h.device, dtype=h.dtype)
    gdt = gl.bfloat16 if h.dtype == torch.bfloat16 else gl.float16

    def desc(x, block):
        return GluonTensorDescriptor.from_tensor(
            x, block, gl.NVMMASharedLayout.get_default_for(block, gdt))

    programs = _programs(cdiv(t, bm) * cdiv(m, bn), h.device)
    _h_ut_gluon_kernel[(programs,)](
        desc(h, [bm, rp]), desc(u, [bn, rp]), desc(y, [bm, bn]),
        bias if bias is not None else y, t, m, HAS_BIAS=bias is not None, PROGRAMS=programs,
        STAGES=stages, C_BUFS=c_bufs, num_warps=warps)
    return y


@triton.jit
def _xv_kernel(x_desc, v_desc, h_desc, K, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, STAGES: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        acc = tl.dot(x_desc.load([pm * BM, k]), v_desc.load([k, pn * BN]), acc)
    h_desc.store([pm * BM, pn * BN], acc.to(h_desc.dtype))


def xv_triton(x, v, tiles):
    bm, bn, bk, warps, stages = tiles
    t, n = x.shape
    r = v.shape[1]
    h = torch.empty((t, r), device=x.device, dtype=x.dtype)
    _xv_kernel[(triton.cdiv(t, bm), triton.cdiv(r, bn))](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(v, [bk, bn]),
        TensorDescriptor.from_tensor(h, [bm, bn]), n, BM=bm, BN=bn, BK=bk, STAGES=stages,
        num_warps=warps)
    return h


def report(path: str) -> str:
    """Markdown tables of a run's JSON lines: each entry against what it replaces (h_ut: cuBLAS's
    second GEMM; xv_triton: its first; whole forwards: dense), ``fill_`` as bandwidth."""
    replaces = {"h_ut": "cublas_gemm2", "h_ut_gluon": "cublas_gemm2", "xv_triton": "cublas_gemm1"}

    def vs(case, rows, what, row):
        g = row["graph_ms"]
        if what.startswith("write"):
            return [f"{case[0] * case[2] * 2 / (g * 1e-3) / 1e12:.2f} TB/s"]
        if what in ("dense", "cublas_gemm1", "cublas_gemm2"):
            return [""]
        base = replaces.get(what.split(" ")[0])
        if base:
            return [f"{rows[base]['graph_ms'] / g:.2f}×"]
        return [f"{rows['dense']['graph_ms'] / g:.2f}× of dense"]

    return report_tables(path, ["vs what it replaces (GPU)"], vs)


def probe_case(t, n, m, r, record):
    """Every entry for one case (its tensors are freed on return)."""
    case = [t, n, m, r]
    x, w, u, v, b, ref_h, ref = probe_inputs(t, n, m, r)
    h = x @ v
    ref_y_of_h = h.double() @ u.double().t() + b.double()
    record(case, "dense", lambda: F.linear(x, w, b))
    y = torch.empty((t, m), device="cuda", dtype=torch.bfloat16)
    record(case, "write y (fill_): the bandwidth reference", lambda: y.fill_(1.0))
    record(case, "cublas_two_gemm", lambda: lowrank_matmul_reference(x, u, v, b), ref)
    record(case, "cublas_gemm1", lambda: x @ v, ref_h)
    record(case, "cublas_gemm2", lambda: F.linear(h, u, b), ref_y_of_h)
    best = best_gluon = None
    for tiles in HUT_TILES:
        for tma_store in (True, False):
            name = f"h_ut {tiles} {'tma' if tma_store else 'plain'}_store"
            row = record(case, name,
                         lambda tiles=tiles, tma_store=tma_store: h_ut(
                             h, u, b, tiles=tiles[:4], tma_store=tma_store,
                             occupancy=tiles[4]),
                         ref_y_of_h)
            best = faster(best, row, (tiles, tma_store, name), 1e-2)
    for tiles in HUT_GLUON_TILES:
        row = record(case, f"h_ut_gluon {tiles}",
                     lambda tiles=tiles: h_ut_gluon(h, u, b, tiles=tiles), ref_y_of_h)
        best_gluon = faster(best_gluon, row, tiles, 1e-2)
    if best_gluon is not None:
        tiles = best_gluon[1]
        record(case, f"cublas_gemm1 + h_ut_gluon {tiles}",
               lambda: h_ut_gluon(x @ v, u, b, tiles=tiles), ref)
    for tiles in XV_TILES:
        record(case, f"xv_triton {tiles}", lambda tiles=tiles: xv_triton(x, v, tiles),
               ref_h)
    if best is not None:
        tiles, tma_store, name = best[1]
        record(case, f"cublas_gemm1 + {name}",
               lambda: h_ut(x @ v, u, b, tiles=tiles[:4], tma_store=tma_store,
                            occupancy=tiles[4]), ref)


if __name__ == "__main__":
    probe_main(CASES, probe_case, report)
