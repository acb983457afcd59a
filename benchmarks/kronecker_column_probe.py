"""Probe: where the time of a column residual goes (40 of 4096 input columns, 1% of a 4096² layer,
T=8192, bf16): the Kronecker kernel alone; the gather of the 40 features; cuBLAS's in-place
product; the shipped order (the residual's product written first, the Kronecker kernel adding
to it); a Triton kernel for that first product with the gather fused; Triton column kernels
at each tile configuration (a tensor-core dot per tile, commit 51b0279; the same with y's
tile loaded before the dot; CUDA-core FMAs); and two bandwidth references that read and write
y once (an in-place add of a scalar; a copy). Every time is a CUDA-graph replay (GPU time);
each output is checked against float64.

    cd benchmarks && python kronecker_column_probe.py > results/kronecker_column_probe.md
"""

import torch
import triton
import triton.language as tl

import layerzip
from layerzip.bench import graphed, machine_info, time_callable
from layerzip_kronecker.triton_kernel import kron_fused


@triton.jit
def _y_tile(y_ptr, T, M, BT: tl.constexpr, BM: tl.constexpr):
    """Program (i, j)'s (BT × BM) tile of y (T × M): first token, token and output offsets,
    tokens in range, pointers and mask."""
    t0 = tl.cast(tl.program_id(0), tl.int64) * BT
    rt = tl.arange(0, BT)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    tok = (t0 + rt) < T
    return t0, rt, rm, tok, y_ptr + (t0 + rt[:, None]) * M + rm[None, :], \
        tok[:, None] & (rm[None, :] < M)


@triton.jit
def _column_residual_dot(xc_ptr, r_ptr, y_ptr, T, M, K, BK: tl.constexpr, BT: tl.constexpr,
                         BM: tl.constexpr, Y_FIRST: tl.constexpr):
    # y[t, :] += xc[t, :] · Rᵀ: a (BT × BM) tile of y per program, read and written once, its
    # xc and R tiles one tensor-core dot per BK features (the kernel of commit 51b0279); with
    # Y_FIRST y's tile is requested before the reduction, so its DRAM latency overlaps the (L2)
    # loads of xc and R and the dot
    t0, rt, rm, tok, yp, ym = _y_tile(y_ptr, T, M, BT, BM)
    if Y_FIRST:
        y = tl.load(yp, mask=ym, other=0.0)
    acc = tl.zeros((BT, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        xc = tl.load(xc_ptr + (t0 + rt[:, None]) * K + rk[None, :],
                     mask=tok[:, None] & (rk[None, :] < K), other=0.0)
        rv = tl.load(r_ptr + rm[None, :] * K + rk[:, None],
                     mask=(rk[:, None] < K) & (rm[None, :] < M), other=0.0)
        acc = tl.dot(xc, rv.to(xc.dtype), acc)
    if not Y_FIRST:
        y = tl.load(yp, mask=ym, other=0.0)
    tl.store(yp, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _column_product_gather(x_ptr, cols_ptr, r_ptr, y_ptr, T, N, M, K, BK: tl.constexpr,
                           BT: tl.constexpr, BM: tl.constexpr):
    # y = x[:, cols] · Rᵀ, y written only: a program gathers its BT tokens' k features once
    # and sweeps all M outputs BM at a time (R tiles from L2): the gather fused, not repeated
    t0 = tl.cast(tl.program_id(0), tl.int64) * BT
    rt = tl.arange(0, BT)
    tok = (t0 + rt) < T
    rk = tl.arange(0, BK)
    cols = tl.load(cols_ptr + rk, mask=rk < K, other=0)
    xc = tl.load(x_ptr + (t0 + rt[:, None]) * N + cols[None, :],
                 mask=tok[:, None] & (rk[None, :] < K), other=0.0)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM)
        rv = tl.load(r_ptr + rm[None, :] * K + rk[:, None],
                     mask=(rk[:, None] < K) & (rm[None, :] < M), other=0.0)
        acc = tl.dot(xc, rv.to(xc.dtype))
        tl.store(y_ptr + (t0 + rt[:, None]) * M + rm[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=tok[:, None] & (rm[None, :] < M))


@triton.jit
def _column_residual_fma(xc_ptr, rt_ptr, y_ptr, T, M, K, BT: tl.constexpr, BM: tl.constexpr):
    # no tensor cores and no shared memory: k rank-1 updates on CUDA cores, from Rᵀ (K × M,
    # rows contiguous) and xc (L1-resident after the first column), so occupancy is set by
    # registers alone
    t0, rt, rm, tok, yp, ym = _y_tile(y_ptr, T, M, BT, BM)
    acc = tl.load(yp, mask=ym, other=0.0).to(tl.float32)
    for c in range(0, K):
        xv = tl.load(xc_ptr + (t0 + rt) * K + c, mask=tok, other=0.0).to(tl.float32)
        rv = tl.load(rt_ptr + c * M + rm, mask=rm < M, other=0.0).to(tl.float32)
        acc += xv[:, None] * rv[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ym)


def gpu_ms(fn) -> float:
    return time_callable(graphed(fn), rounds=30, warmup=3).median * 1e3


def main() -> None:
    torch.manual_seed(0)
    t, n, m, k = 8192, 4096, 4096, 40
    dt = torch.bfloat16
    x = torch.randn(t, n, device="cuda", dtype=dt)
    a = torch.randn(1, 64, 64, device="cuda", dtype=dt)
    b = torch.randn(1, 64, 64, device="cuda", dtype=dt)
    cols = torch.randperm(n, device="cuda")[:k].sort().values.to(torch.int32)
    vals = torch.randn(m, k, device="cuda", dtype=dt)
    be = layerzip.get_backend("kron_matmul", "triton")
    with torch.no_grad():
        y0 = be(x, a, b, None, None, None)
        xc = x.index_select(1, cols.long())
        want = y0.double() + xc.double() @ vals.double().t()
        w = torch.einsum("kij,kab->iajb", a.float(), b.float()).reshape(m, n)
        w[:, cols.long()] += vals.float()
        w = w.to(dt)
        y = y0.clone()
        rows = [("dense cuBLAS x Wᵀ", gpu_ms(lambda: x @ w.t()), None)]

        def err(out):
            return float((out.double() - want).norm() / want.norm())

        rows.append(("Kronecker kernel alone (no residual)",
                     gpu_ms(lambda: be(x, a, b, None, None, None)), None))
        rows.append(("whole layer, shipped path", gpu_ms(lambda: be(x, a, b, cols, vals, None)),
                     err(be(x, a, b, cols, vals, None))))
        rows.append(("index_select of the 40 features", gpu_ms(
            lambda: x.index_select(1, cols.long())), None))
        rows.append(("y.addmm_(xc, Rᵀ) (cuBLAS, in place)", gpu_ms(
            lambda: y.addmm_(xc, vals.t())), err(y0.clone().addmm_(xc, vals.t()))))
        # the shipped order: the residual's product first (y written once), then the Kronecker
        # kernel adds its own to it (y read once more)
        fresh = torch.empty_like(y0)
        rows.append(("torch.mm(xc, Rᵀ, out=y) (cuBLAS, y written only)", gpu_ms(
            lambda: torch.mm(xc, vals.t(), out=fresh)), None))
        prod = xc.double() @ vals.double().t()
        for bt, bm, nw in ((64, 256, 8), (64, 128, 4), (32, 128, 4), (128, 128, 8)):
            def gather_product(bt=bt, bm=bm, nw=nw):
                _column_product_gather[(triton.cdiv(t, bt),)](
                    x, cols, vals, fresh, t, n, m, k, BK=64, BT=bt, BM=bm, num_warps=nw,
                    num_stages=3)

            gather_product()
            e = float((fresh.double() - prod).norm() / prod.norm())
            rows.append((f"Triton gather + product, y written only, BT={bt} BM={bm} "
                         f"warps={nw}", gpu_ms(gather_product), e))
        rows.append(("Kronecker kernel adding to y (kron_fused(out=y))", gpu_ms(
            lambda: kron_fused(x, a, b, out=fresh)), None))
        torch.mm(xc, vals.t(), out=fresh)
        kron_fused(x, a, b, out=fresh)
        rows.append(("the two above, checked", None, err(fresh)))
        rows.append(("y.add_(1) (reads and writes y once)", gpu_ms(lambda: y.add_(1.0)), None))
        y2 = torch.empty_like(y)
        rows.append(("y2.copy_(y) (reads y, writes y2)", gpu_ms(lambda: y2.copy_(y)), None))
        # num_stages=1: the reduction is one step (k ≤ 64), so a second shared-memory buffer
        # only lowers how many programs fit on an SM
        for bt, bm, nw, ns in [(bt, bm, nw, ns) for ns in (2, 1) for bt, bm, nw in (
                (128, 128, 4), (128, 128, 8), (64, 256, 8), (256, 64, 8), (128, 64, 4),
                (64, 128, 4), (64, 64, 4), (64, 64, 2), (32, 128, 4), (256, 128, 8))]:
            grid = (triton.cdiv(t, bt), triton.cdiv(m, bm))

            for name, y_first in (("dot", False), ("y first", True)):
                def fn(bt=bt, bm=bm, nw=nw, ns=ns, grid=grid, y_first=y_first):
                    _column_residual_dot[grid](xc, vals, y, t, m, k, BK=64, BT=bt, BM=bm,
                                               Y_FIRST=y_first, num_warps=nw, num_stages=ns)

                y.copy_(y0)
                fn()
                e = err(y)
                rows.append((f"column kernel, {name}, BT={bt} BM={bm} warps={nw} stages={ns}",
                             gpu_ms(fn), e))
        vals_t = vals.t().contiguous()
        for bt, bm, nw in ((64, 64, 4), (32, 128, 4), (64, 128, 4), (64, 128, 8),
                           (128, 64, 8), (16, 256, 4), (32, 256, 8)):
            grid = (triton.cdiv(t, bt), triton.cdiv(m, bm))

            def fma(bt=bt, bm=bm, nw=nw, grid=grid):
                _column_residual_fma[grid](xc, vals_t, y, t, m, k, BT=bt, BM=bm, num_warps=nw)

            y.copy_(y0)
            fma()
            e = err(y)
            rows.append((f"column kernel, CUDA-core FMAs, BT={bt} BM={bm} warps={nw}",
                         gpu_ms(fma), e))
    print(f"Machine: {machine_info()}\n")
    print("| what | GPU ms | rel. error vs float64 |\n|---|---|---|")
    for name, ms, e in rows:
        print(f"| {name} | {'—' if ms is None else f'{ms:.4f}'} | "
              f"{'—' if e is None else f'{e:.1e}'} |")


if __name__ == "__main__":
    main()
