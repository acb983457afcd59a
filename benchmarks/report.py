"""Turn pytest-benchmark JSON files into a markdown table and plots in benchmarks/results/.

    python benchmarks/report.py benchmarks/results/lowrank_gpu.json \
        --out benchmarks/results/lowrank_gpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("case", "{}"), ("residual_fraction", "{:g}"), ("residual_structure", "{}"),
           ("backend", "{}"), ("scope", "{}"), ("context", "{}"), ("graphs", "{}"),
           ("mode", "{}"),
           ("dense_ms", "{:.4f}"), ("lowrank_ms", "{:.4f}"), ("speedup", "{:.2f}×"),
           ("dense_single_graph_ms", "{:.4f}"), ("lowrank_single_graph_ms", "{:.4f}"),
           ("lowrank_calls_per_replay", "{}"),
           ("graph_dense_ms", "{:.4f}"), ("graph_kron_ms", "{:.4f}"),
           ("graph_speedup", "{:.2f}×"), ("host_us", "{:.0f}"), ("flop_ratio", "{:.2f}×"),
           ("byte_ratio", "{:.2f}×"),
           ("linear_flop_ratio", "{:.2f}×"), ("dense_weight_gb", "{:.2f}"),
           ("lowrank_weight_gb", "{:.2f}"), ("efficiency_flops", "{:.0%}"),
           ("efficiency_bytes", "{:.0%}"), ("lowrank_tflops", "{:.0f}"),
           ("dense_backward_ms", "{:.4f}"), ("kron_backward_ms", "{:.4f}"),
           ("backward_speedup", "{:.2f}×"), ("graph_backward_speedup", "{:.2f}×"),
           ("kernel_rel_error", "{:.1e}"), ("compiled_rel_error", "{:.1e}"),
           ("graph_error", "{}"), ("config", "{}")]


def rows_of(data: dict) -> list[dict]:
    rows = []
    for b in data["benchmarks"]:
        info = dict(b.get("extra_info", {}))
        if "speedup" not in info:
            continue
        info["case"] = b["name"].split("[", 1)[0].removeprefix("test_") + \
            (f" T={info['T']} {info['n']}→{info['m']} r={info['r']}" if "T" in info else
             f" tokens={info.get('tokens')}")
        rows.append(info)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    out = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f.format(r[c]) if c in r and r[c] is not None else "—"
                                     for c, f in cols) + " |")
    return "\n".join(out) + "\n"


def _finish(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plots(rows: list[dict], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    prefill = [r for r in rows if r.get("T", 0) >= 1024 and "r" in r and "efficiency_flops" in r]
    if prefill:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for (n, m) in sorted({(r["n"], r["m"]) for r in prefill}):
            for backend in sorted({r["backend"] for r in prefill}):
                pts = sorted((r["r"], r["speedup"], r["efficiency_flops"]) for r in prefill
                             if (r["n"], r["m"], r["backend"]) == (n, m, backend))
                if pts:
                    label = f"{backend} {n}→{m}"
                    axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
                    axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=label)
        ranks = sorted({r["r"] for r in prefill})
        n0, m0 = prefill[0]["n"], prefill[0]["m"]
        axes[0].plot(ranks, [n0 * m0 / (r * (n0 + m0)) for r in ranks], "k--",
                     label=f"FLOP ratio {n0}→{m0}")
        axes[0].set(xscale="log", yscale="log", xlabel="rank", ylabel="speedup vs dense",
                    title=f"T={prefill[0]['T']}, bf16")
        axes[1].set(xscale="log", xlabel="rank", ylabel="achieved / FLOP-ratio speedup",
                    title="efficiency")
        made.append(_finish(fig, axes, stem.with_name(stem.name + "_speedup_vs_rank.png")))
    timed = [r for r in rows if r.get("kernel_rel_error") and r.get("speedup")]
    if timed:  # what each backend trades: speed against its error vs the float64 reference
        fig, ax = plt.subplots(figsize=(6, 4))
        for backend in sorted({r["backend"] for r in timed}):
            pts = [(r["speedup"], r["kernel_rel_error"]) for r in timed if r["backend"] == backend]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=backend)
        ax.axvline(1.0, color="k", ls="--", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="speedup vs dense (same process)",
               ylabel="relative error vs float64 reference", title="speed / accuracy by backend")
        made.append(_finish(fig, [ax], stem.with_name(stem.name + "_tradeoff.png")))
    return made


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", required=True, help="path stem for .md and .png files")
    ap.add_argument("--made-by", default="",
                    help="markdown put first in the .md: the command(s) that produced the JSON")
    args = ap.parse_args()
    rows, machine = [], {}
    for f in args.json:
        data = json.loads(Path(f).read_text())
        machine = data.get("machine_info", {}).get("layerzip", machine)
        rows += rows_of(data)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    header = (f"{args.made_by}\n\n" if args.made_by else "") + \
        (f"Machine: {machine}\n\n" if machine else "")
    stem.with_suffix(".md").write_text(header + markdown(rows))
    for p in plots(rows, stem):
        print("wrote", p)
    print(markdown(rows))


if __name__ == "__main__":
    main()
