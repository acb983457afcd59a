"""Tables and plots from a test_kschain_speed.py run (pytest-benchmark JSON).

    python benchmarks/kschain_report.py benchmarks/results/kschain_gpu.json \
        --out benchmarks/results/kschain_gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(path: str) -> tuple[list[dict], dict]:
    data = json.loads(Path(path).read_text())
    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind")]
    return rows, data.get("machine_info", {})


def _pat(r):
    return "({},{},{},{})".format(*r["pattern"])


def _same_layout_bmm(fwd: list[dict]) -> dict:
    """(pattern, layout) → eager bmm time in that layout."""
    out = {}
    for r in fwd:
        if r["impl"] in ("bmm", "bmm_bs_last"):
            out[(_pat(r), r["impl"].endswith("_bs_last"))] = r["kernel_ms"]
    return out


def _vs_bmm(r, bmm) -> float:
    base = bmm.get((_pat(r), r["impl"].endswith("_bs_last")))
    return base / r["kernel_ms"] if base else float("nan")


def _verdict(value: float, target: float) -> str:
    return "(met)" if value >= target else "(MISSED)"


def summary(rows: list[dict]) -> list[str]:
    out = ["## Targets (issue #8) against this run", "",
           "bmm is compared in the same layout (batch-first kernel vs batch-first bmm, "
           "batch-last vs batch-last). 'graph' = per call inside a CUDA graph of repeated calls "
           "(layerzip.bench.graph_time): the GPU's time, as in a captured model step; 'eager' = "
           "one Python call at a time, bound by the host's ≈ 30–45 µs per call for most "
           "factors here. Each target is judged on both.", ""]
    fwd = [r for r in rows if r["kind"] == "factor_forward"]
    bmm = _same_layout_bmm(fwd)
    sel_b = [r for r in fwd if r["b"] >= 16]
    for impl in ("triton", "triton_2d", "triton_3d", "triton_bs_last"):
        sel = [r for r in sel_b if r["impl"] == impl]
        if not sel:
            continue
        med = statistics.median(_vs_bmm(r, bmm) for r in sel)
        gmed = statistics.median(r.get("graph_speedup_vs_bmm_same_layout", float("nan"))
                                 for r in sel)
        low = [r for r in sel if r["density"] <= 1 / 16]
        med_d = statistics.median(r["speedup_vs_dense"] for r in low) if low else float("nan")
        gmed_d = statistics.median(r.get("graph_speedup_vs_dense", float("nan"))
                                   for r in low) if low else float("nan")
        out.append(f"- forward, {impl} ({len(sel)} patterns), median over bmm (target ≥ 1.4×): "
                   f"graph {gmed:.2f}× {_verdict(gmed, 1.4)}, eager {med:.2f}× "
                   f"{_verdict(med, 1.4)}; median over dense at density ≤ 1/16 (target ≥ 2×): "
                   f"graph {gmed_d:.2f}× {_verdict(gmed_d, 2)}, eager {med_d:.2f}× "
                   f"{_verdict(med_d, 2)}")
    hosts = {impl: statistics.median(r["host_us"] for r in fwd if r["impl"] == impl)
             for impl in ("bmm", "bmm_bs_last", "triton", "triton_bs_last")
             if any(r["impl"] == impl and "host_us" in r for r in fwd)}
    if hosts:
        out.append("- host time per call (CPU enqueue, median over patterns): " + ", ".join(
            f"{impl} {us:.0f} µs" for impl, us in hosts.items()) + " — the floor of every "
            "eager time: small factors are host-bound, which the graph columns remove")
    bwd = [r for r in rows if r["kind"] == "factor_fwd_bwd"]
    bwd_bmm = {(_pat(r), r["impl"].endswith("_bs_last")): r["kernel_ms"] for r in bwd
               if r["impl"] in ("bmm", "bmm_bs_last")}
    for impl in ("triton", "triton_bs_last"):
        sel = [r for r in bwd if r["impl"] == impl]
        if sel:
            med = statistics.median(_vs_bmm(r, bwd_bmm) for r in sel)
            graphed = [r["graph_speedup_vs_bmm_same_layout"] for r in sel
                       if "graph_speedup_vs_bmm_same_layout" in r]
            gmed = (f"graph {statistics.median(graphed):.2f}× over {len(graphed)} patterns "
                    f"{_verdict(statistics.median(graphed), 1.2)}, " if graphed else "")
            out.append(f"- forward + backward, {impl} ({len(sel)} patterns), median over bmm in "
                       f"the same layout (target ≥ 1.2×): {gmed}eager {med:.2f}× "
                       f"{_verdict(med, 1.2)}")
    chain = [r for r in rows if r["kind"] == "monarch_chain"]
    for impl in sorted({r["impl"] for r in chain}):
        sel = sorted((r for r in chain if r["impl"] == impl), key=lambda r: r["rank"])
        for key, how in (("graph_speedup_vs_dense", "graph"), ("speedup_vs_dense", "eager")):
            if not all(key in r for r in sel):
                continue
            faster = [r["rank"] for r in sel if r[key] > 1]
            out.append(f"- Monarch 4096² chain, {impl}, {how}: faster than dense up to rank "
                       f"{max(faster) if faster else 'none'} "
                       "(" + ", ".join(f"r{r['rank']} {r[key]:.2f}×" for r in sel) + ")")
    return out + [""]


def tables(rows: list[dict]) -> list[str]:
    out = []
    fwd = [r for r in rows if r["kind"] == "factor_forward"]
    bmm = _same_layout_bmm(fwd)
    impls = ("bmm_bs_last", "triton", "triton_2d", "triton_3d", "triton_bs_last")
    if fwd:
        out += ["## Per factor, forward (bf16, T = 8192)", "",
                "Cells: eager ×dense / ×bmm (same layout) · graph ×dense / ×bmm.", "",
                "| pattern (a,b,c,d) | N | density | dense ms | bmm ms | "
                + " | ".join(impls) + " | triton err |", "|---|---|---|---|---|" +
                "---|" * len(impls) + "---|"]
        by: dict = {}
        for r in fwd:
            by.setdefault(_pat(r), {})[r["impl"]] = r
        for pat, got in by.items():
            r0 = next(iter(got.values()))
            cells = []
            for i in impls:
                r = got.get(i)
                if r is None:
                    cells.append("—")
                    continue
                g = (f" · {r['graph_speedup_vs_dense']:.2f} / "
                     f"{r['graph_speedup_vs_bmm_same_layout']:.2f}"
                     if "graph_speedup_vs_dense" in r else "")
                cells.append(f"{r['speedup_vs_dense']:.2f} / {_vs_bmm(r, bmm):.2f}{g}")
            err = got.get("triton", {}).get("kernel_rel_error", float("nan"))
            out.append(f"| {pat} | {r0['N']} | 1/{round(1 / r0['density'])} | "
                       f"{r0['dense_ms']:.3f} | {r0['bmm_ms']:.3f} | " + " | ".join(cells)
                       + f" | {err:.1e} |")
        out.append("")
    bwd = [r for r in rows if r["kind"] == "factor_fwd_bwd"]
    if bwd:
        out += ["## Per factor, forward + backward (bf16, T = 8192)", "",
                "Eager: one autograd step bracketed by CUDA events; graph: the same step "
                "replayed from a CUDA graph (×bmm there is against bmm in the same layout).", "",
                "| pattern | impl | dense ms | bmm ms | kernel ms | ×dense | ×bmm "
                "| graph kernel ms | graph ×dense | graph ×bmm | dX err | dW err |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        nan = float("nan")
        for r in bwd:
            out.append(f"| {_pat(r)} | {r['impl']} | {r['dense_ms']:.3f} | {r['bmm_ms']:.3f} | "
                       f"{r['kernel_ms']:.3f} | {r['speedup_vs_dense']:.2f} | "
                       f"{r['speedup_vs_bmm']:.2f} | {r.get('graph_kernel_ms', nan):.3f} | "
                       f"{r.get('graph_speedup_vs_dense', nan):.2f} | "
                       f"{r.get('graph_speedup_vs_bmm_same_layout', nan):.2f} | "
                       f"{r['grad_x_rel_error']:.1e} | {r['grad_w_rel_error']:.1e} |")
        out.append("")
    chain = [r for r in rows if r["kind"] == "monarch_chain"]
    if chain:
        out += ["## Monarch-like chain (1,64r,64,64)(64,64,64r,1), 4096×4096, T = 8192", "",
                "| rank | params (% of dense) | impl | dense ms | chain ms | ×dense "
                "| graph ×dense | err |",
                "|---|---|---|---|---|---|---|---|"]
        for r in sorted(chain, key=lambda r: (r["rank"], r["impl"])):
            out.append(f"| {r['rank']} | {100 * r['param_fraction']:.1f}% | {r['impl']} | "
                       f"{r['dense_ms']:.3f} | {r['kernel_ms']:.3f} | "
                       f"{r['speedup_vs_dense']:.2f} | "
                       f"{r.get('graph_speedup_vs_dense', float('nan')):.2f} | "
                       f"{r['kernel_rel_error']:.1e} |")
        out.append("")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fwd = [r for r in rows if r["kind"] == "factor_forward" and r["b"] >= 16]
    bs = sorted({r["b"] for r in fwd})
    if not bs:
        return
    # top row: GPU time per call inside CUDA graphs (what the targets are judged on); bottom:
    # eager calls, host-bound for small factors
    rows_of = (("graph_speedup_vs_dense", "GPU time (CUDA graphs)"),
               ("speedup_vs_dense", "eager"))
    fig, axes = plt.subplots(2, len(bs), figsize=(5 * len(bs), 8), squeeze=False)
    for (key, how), ax_row in zip(rows_of, axes):
        for ax, b in zip(ax_row, bs):
            for impl in ("bmm", "bmm_bs_last", "triton", "triton_2d", "triton_3d",
                         "triton_bs_last"):
                sel = [r for r in fwd if r["b"] == b and r["impl"] == impl and key in r]
                if not sel:
                    continue
                by_density: dict = {}
                for r in sel:
                    by_density.setdefault(r["density"], []).append(r[key])
                xs = sorted(by_density)
                ax.plot(xs, [statistics.median(by_density[x]) for x in xs], marker="o",
                        label=impl)
            ax.axhline(1, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("density 1/(a·d)")
            ax.set_title(f"b = c = {b}, {how}; median over a/d splits", fontsize=9)
        ax_row[0].set_ylabel("× dense (bf16, T=8192)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--made-by", default="`SUITES=test_kschain_speed.py NAME=kschain_gpu bash "
                    "benchmarks/device_run.sh`",
                    help="the command(s) that produced the JSON (markdown)")
    args = ap.parse_args()
    rows, machine = load(args.json)
    gpu = machine.get("layerzip", {}).get("gpu") or machine.get("layerzip", {})
    text = ["# KS-chain kernels on the GPU", "",
            f"Made by {args.made_by} on the lent GPU (machine: " + json.dumps(gpu) + ").", ""]
    text += summary(rows) + tables(rows)
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    plot(rows, out.parent / (out.name + "_speedup_vs_density.png"))
    print("\n".join(text))


if __name__ == "__main__":
    main()
