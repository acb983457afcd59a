"""SmolLM2-135M perplexity vs parameters removed: plain SVD vs whitened SVD (SVD-LLM).

Same data as the main job: calibration = the first 8×256 tokens of pydoc_data.topics text,
perplexity on the next 8×256 tokens (never used to fit). Every attention and MLP projection of
the 30 blocks is replaced at the given ratio ρ (fraction of its parameters removed).

    .venv/bin/python benchmarks/lowrank_perplexity.py --out benchmarks/results/lowrank_perplexity
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import layerzip
from layerzip.evaluate import perplexity
from layerzip.models import default_text, load_model, text_windows

TARGETS = ["re:.*\\.(self_attn|mlp)\\.[^.]+"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/lowrank_perplexity")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).with_suffix(".json").read_text())["rows"], Path(args.out))
        return
    lm = load_model("smollm2")
    text = default_text()
    calib = text_windows(lm.tokenizer, text, args.window, args.calib_windows)
    held = text_windows(lm.tokenizer, text, args.window, args.eval_windows,
                        skip_windows=args.calib_windows)
    rows = [{"method": "dense", "ratio": 0.0, "perplexity": perplexity(lm.model, held)}]
    print(rows[-1], flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for whiten in (False, True):
            model = copy.deepcopy(lm.model)
            spec = {"rules": [{"targets": TARGETS, "method": "svd",
                               "params": {"ratio": ratio, "whiten": whiten}}]}
            t0 = time.perf_counter()
            report = layerzip.compress(model, spec, calibration=calib if whiten else None,
                                       progress=False)
            tot = report.totals()
            rows.append({"method": "svd (whitened)" if whiten else "svd", "ratio": ratio,
                         "perplexity": perplexity(model, held),
                         "params_removed": 1 - tot["params_after"] / tot["params_before"],
                         "model_params": tot["model_params_after"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/lowrank_perplexity.py", "torch": torch.__version__,
            "calibration_tokens": args.window * args.calib_windows,
            "eval_tokens": args.window * args.eval_windows, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["| ρ (params removed) | svd ppl | whitened svd ppl |", "|---|---|---|",
             f"| 0 (dense) | {rows[0]['perplexity']:.2f} | {rows[0]['perplexity']:.2f} |"]
    for ratio in sorted({r["ratio"] for r in rows[1:]}):
        p = {r["method"]: r["perplexity"] for r in rows if r["ratio"] == ratio}
        lines.append(f"| {ratio:.1f} | {p['svd']:.4g} | {p['svd (whitened)']:.4g} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out)
    print("\n".join(lines))


def plot(rows: list[dict], out: Path) -> None:
    """Perplexity (log scale) against the fraction of parameters removed, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = rows[0]["perplexity"]
    for method in ("svd", "svd (whitened)"):
        pts = sorted((r["params_removed"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    ax.axhline(dense, color="k", ls="--", label=f"dense ({dense:.1f})")
    ax.set(yscale="log", xlabel="fraction of the replaced layers' parameters removed",
           ylabel="held-out perplexity", title="SmolLM2-135M, all block projections")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "_vs_params.png"), dpi=110)


if __name__ == "__main__":
    main()
