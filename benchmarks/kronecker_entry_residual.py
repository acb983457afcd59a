"""The residual of single entries alone: the gather kernel (residual_kernel.py) against
cuSPARSE CSR (the torch path) and the dense layer, at T = 8192 on a 4096² layer. Each way
is checked against float64 and timed per call from a CUDA graph (layerzip.bench).

Rows: the whole kernel call (xᵀ made inside), the persistent variant (each program transposes
its own token tiles), the transpose alone, the kernel given xᵀ for a grid of tile
configurations (wider than the autotuner's), and the torch CSR path; for 1% of the entries
spread uniformly and for a skewed pattern (half of them in 1% of the rows, as around outlier
channels).

    python benchmarks/kronecker_entry_residual.py --out benchmarks/results/kronecker_entry_residual
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from layerzip import cdiv
from layerzip.bench import graphed, time_callable, wake_gpu
from layerzip_kronecker.module import add_residual_and_bias
from layerzip_kronecker.residual_kernel import (
    SLICE_ROWS,
    UNROLL,
    _entry_residual,
    _entry_residual_persistent,
    add_entry_residual_,
    pack_entry_residual,
)

GRID = [(bt, warps, False) for bt in (8, 16, 32) for warps in (2, 4, 8)]
# xᵀ by token tiles (T/BT, n, BT): a program's tile is contiguous, its L1 lines used whole
TILED_GRID = [(bt, warps, True) for bt in (8, 16, 32) for warps in (1, 2, 4, 8)]


def pattern(m: int, n: int, nnz: int, skewed: bool, g: torch.Generator) -> torch.Tensor:
    if not skewed:
        return torch.randperm(m * n, generator=g)[:nnz].sort().values
    hot = torch.randperm(m, generator=g)[: max(1, m // 100)]
    rows = torch.cat([hot[torch.randint(0, hot.numel(), (nnz // 2,), generator=g)],
                      torch.randint(0, m, (nnz - nnz // 2,), generator=g)])
    return (rows * n + torch.randint(0, n, (nnz,), generator=g)).unique()


def tiled(x: torch.Tensor, bt: int) -> torch.Tensor:
    """xᵀ by token tiles: (T/BT, n, BT), T a multiple of BT."""
    t, n = x.shape
    return x.view(t // bt, bt, n).transpose(1, 2).contiguous()


def gpu_ms(fn) -> float:
    return time_callable(graphed(fn), rounds=30, warmup=3).median * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kronecker_entry_residual")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    t, m, n = args.tokens, 4096, 4096
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, n, generator=g).cuda().bfloat16()
    y0 = torch.randn(t, m, generator=g).cuda().bfloat16()
    w = torch.randn(m, n, generator=g).cuda().bfloat16()
    wake_gpu()
    rows = [{"case": "dense layer x Wᵀ", "ms": gpu_ms(lambda: x @ w.t())}]
    rows.append({"case": "transpose x (xᵀ contiguous)", "ms": gpu_ms(lambda: x.t().contiguous())})
    for bt in (8, 16, 32):
        rows.append({"case": f"transpose x by token tiles of {bt} (torch)",
                     "ms": gpu_ms(lambda bt=bt: tiled(x, bt))})
    for skewed in (False, True):
        flat = pattern(m, n, int(0.01 * m * n), skewed, g)
        idx = flat.cuda().to(torch.int32)
        val = torch.randn(idx.numel(), generator=g).cuda().bfloat16()
        name = "skewed" if skewed else "uniform"
        packed = pack_entry_residual(idx, val, m, n)
        want = add_residual_and_bias(y0.double(), x.double(), idx, val.double(), None)
        y = y0.clone()
        add_entry_residual_(y, x, packed)  # autotunes (restoring y) then runs once
        err = float((y.double() - want).norm() / (want - y0.double()).norm())
        meta = {"nnz": idx.numel(), "padded": packed.cols.numel(),
                "overflow_slices": packed.n_slices - packed.n_regular, "rel_error": err,
                "best_config": str(_entry_residual.best_config)}
        rows.append({"case": f"{name}: gather kernel, xᵀ made inside",
                     "ms": gpu_ms(lambda: add_entry_residual_(y, x, packed)), **meta})
        yp = y0.clone()
        add_entry_residual_(yp, x, packed, persistent=True)  # checked before timing adds more
        err = float((yp.double() - want).norm() / (want - y0.double()).norm())
        rows.append({"case": f"{name}: persistent gather kernel, transposing its own tiles",
                     "ms": gpu_ms(lambda: add_entry_residual_(yp, x, packed, persistent=True)),
                     "rel_error": err, "best_config": str(_entry_residual_persistent.best_config)})
        xt = x.t().contiguous()
        xtt = {bt: tiled(x, bt) for bt in (8, 16, 32)}
        for bt, warps, tile in GRID + TILED_GRID:
            def call(bt=bt, warps=warps, tile=tile, y=y):
                _entry_residual.fn[(cdiv(t, bt),)](
                    xtt[bt] if tile else xt, packed.cols, packed.vals, packed.offsets, packed.widths,
                    packed.lane_rows, packed.slice_rows, y, y, t, 1 << (t - 1).bit_length(),
                    m, n, packed.n_slices, packed.n_regular, packed.n_multi, HAS_BIAS=False,
                    SR=SLICE_ROWS, KU=UNROLL, BT=bt, TILED=tile, num_warps=warps)
            layout = "xᵀ by token tiles" if tile else "xᵀ"
            case = f"{name}: kernel given {layout}, BT={bt} warps={warps}"
            try:
                once = y0.clone()
                call(y=once)  # checked before timing adds more
                err = float((once.double() - want).norm() / (want - y0.double()).norm())
                rows.append({"case": case, "ms": gpu_ms(call), "rel_error": err})
            except Exception as e:  # noqa: BLE001 - a config that fails is a finding
                rows.append({"case": case, "error": repr(e)[:200]})
            print(json.dumps(rows[-1]), flush=True)
        rows.append({"case": f"{name}: torch CSR (cuSPARSE, fp32)",
                     "ms": gpu_ms(lambda: add_residual_and_bias(y0, x, idx, val, None))})
    dense = rows[0]["ms"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(),
         "torch": torch.__version__, "rows": rows}, indent=1))
    lines = ["| case | ms | vs dense | rel. error (of the residual) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r.get('ms', float('nan')):.4f} | "
                     f"{dense / r['ms'] if 'ms' in r else float('nan'):.2f}× | "
                     f"{r.get('rel_error', r.get('error', '—'))} |")
    print("\n".join(lines))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
