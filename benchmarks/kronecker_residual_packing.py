"""How the residual gather kernel's packing (plugins/kronecker/.../residual_kernel.py) fits real
weights: for SmolLM2-135M projections compressed to one Kronecker term plus 1% of single
entries, the slots the sliced ELL takes per kept entry and the overflow slices that long rows
(outlier channels) need, next to a uniform random pattern of the same size. Every slot is an
entry the kernel loads and a masked gather it issues, so slots per entry is the kernel's
overhead over a perfect packing. CPU only: no timing.

    .venv/bin/python benchmarks/kronecker_residual_packing.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from layerzip_kronecker.module import KroneckerLinear
from layerzip_kronecker.residual_kernel import pack_entry_residual

import layerzip
from layerzip.models import load_model

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def describe(idx: torch.Tensor, m: int, n: int) -> dict:
    p = pack_entry_residual(idx, torch.ones(idx.numel()), m, n)
    counts = torch.bincount(idx.long() // n, minlength=m).double()
    return {"nnz": idx.numel(), "slots": p.cols.numel(),
            "slots_per_entry": p.cols.numel() / max(1, idx.numel()),
            "overflow_slices": p.n_slices - p.n_regular,
            "one_row_slices": p.slice_rows.numel(),
            "longest_row_vs_mean": float(counts.max() / counts.mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kronecker_residual_packing")
    ap.add_argument("--layers", default="0,10,20,29")
    args = ap.parse_args()
    lm = load_model("smollm2")
    g = torch.Generator().manual_seed(0)
    rows = []
    for layer in (int(i) for i in args.layers.split(",")):
        names = [f"model.layers.{layer}.{p}" for p in PROJECTIONS]
        layerzip.compress(lm.model, {"rules": [{"targets": names, "method": "kronecker",
                                                "params": {"factors": "auto", "rank": 1,
                                                           "residual_fraction": 0.01}}]},
                          progress=False)
        for name in names:
            mod = lm.model.get_submodule(name)
            assert isinstance(mod, KroneckerLinear)
            m, n = mod.out_features, mod.in_features
            real = describe(mod.res_idx, m, n)
            uniform = describe(torch.randperm(m * n, generator=g)[:mod.res_idx.numel()]
                               .sort().values, m, n)
            rows.append({"layer": name, "shape": f"{n}→{m}", **real,
                         "uniform_slots_per_entry": uniform["slots_per_entry"]})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join([".venv/bin/python", *sys.argv]), "rows": rows}, indent=1) + "\n")
    lines = ["Made by `.venv/bin/python benchmarks/kronecker_residual_packing.py` (CPU; no "
             "timing). One Kronecker term plus 1% of single entries per projection; a slot is "
             "an entry the gather kernel loads (padding included), so slots per entry is its "
             "overhead over a perfect packing. Overflow slices: of many rows (a row per lane) "
             "and, for rows with 64 or more entries past the cap, of one row.", "",
             "| layer | shape | kept entries | slots per entry | overflow slices (one-row) | "
             "longest row / mean | uniform pattern: slots per entry |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['nnz']} | {r['slots_per_entry']:.2f} "
                     f"| {r['overflow_slices']} ({r['one_row_slices']}) | "
                     f"{r['longest_row_vs_mean']:.1f} | {r['uniform_slots_per_entry']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
