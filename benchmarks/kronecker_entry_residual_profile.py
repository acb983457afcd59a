"""One launch of each entry-residual gather kernel (residual_kernel.py) at T = 8192 on a
4096² layer with 1% of its entries, to run under Nsight Compute and read where the time
goes (L1 hit rate, occupancy, warp stalls):

    ncu --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        -k regex:entry_residual python benchmarks/kronecker_entry_residual_profile.py
"""

from __future__ import annotations

import torch
from layerzip import cdiv
from layerzip_kronecker.residual_kernel import (
    SLICE_ROWS,
    TRANSPOSE_COLUMNS,
    UNROLL,
    _entry_residual,
    _entry_residual_persistent,
    _programs,
    pack_entry_residual,
)


def main() -> None:
    t, m, n = 8192, 4096, 4096
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, n, generator=g).cuda().bfloat16()
    y = torch.zeros(t, m, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(m * n, generator=g)[: m * n // 100].sort().values
    packed = pack_entry_residual(idx.cuda().to(torch.int32),
                                 torch.randn(idx.numel(), generator=g).cuda().bfloat16(), m, n)
    args = (packed.cols, packed.vals, packed.offsets, packed.widths, packed.lane_rows,
            packed.slice_rows, y, y)
    sizes = (t, t, m, n, packed.n_slices, packed.n_regular, packed.n_multi)
    meta = {"HAS_BIAS": False, "SR": SLICE_ROWS, "KU": UNROLL}
    xt = x.t().contiguous()
    for bt, warps in ((16, 4), (32, 8)):
        _entry_residual.fn[(cdiv(t, bt),)](xt, *args, *sizes, **meta, BT=bt, num_warps=warps)
    g_sm = _programs(x.device)
    scratch = torch.empty(g_sm * n * 16, device="cuda", dtype=x.dtype)
    _entry_residual_persistent.fn[(g_sm,)](x, scratch, *args, *sizes, x.stride(0), **meta,
                                           BT=16, NC=TRANSPOSE_COLUMNS, num_warps=4)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
