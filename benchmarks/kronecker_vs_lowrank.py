"""Kronecker (r = 1, 2, 4; with and without a 1% sparse residual) against the low-rank plugin's
SVD at the SAME parameter count, on real SmolLM2-135M weights.

Per layer: relative output error on held-out activations (calibration = the first 4×256
tokens of pydoc_data.topics text; held out = the next 2×256). Whole model: every block
projection replaced, perplexity on the next 8×256 tokens. Plain (unwhitened) SVD, so both
methods see only the weights.

    .venv/bin/python benchmarks/kronecker_vs_lowrank.py
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import layerzip
from layerzip.evaluate import perplexity
from layerzip.models import default_text, load_model, text_windows

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.gate_proj",
          "model.layers.20.mlp.down_proj"]
ALL = "re:.*\\.(self_attn|mlp)\\.[^.]+"


def kron_params(rank: int, residual: bool) -> dict:
    p = {"factors": "auto", "rank": rank}
    return {**p, "residual_fraction": 0.01} if residual else p


def svd_rules_matching(model, kron_spec) -> dict:
    """One svd rule per layer with the largest rank whose stored size ≤ the Kronecker layer's."""
    p = layerzip.plan(model, kron_spec)
    rules = []
    for layer in p.layers:
        m, n = layer.view.shape
        bias = m if layer.view.bias is not None else 0
        rank = max(1, (layer.after.params - bias) // (m + n))
        rules.append({"targets": [layer.name], "method": "svd", "params": {"rank": rank}})
    return {"rules": rules}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kronecker_vs_lowrank")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    lm = load_model("smollm2")
    text = default_text()
    calib = text_windows(lm.tokenizer, text, 256, 4)
    held = text_windows(lm.tokenizer, text, 256, 2, skip_windows=4)
    ppl_windows = text_windows(lm.tokenizer, text, 256, 8, skip_windows=8)
    rows = []
    for name in LAYERS:
        for rank in (1, 2, 4):
            for residual in (False, True):
                kspec = {"rules": [{"targets": [name], "method": "kronecker",
                                    "params": kron_params(rank, residual)}]}
                sspec = svd_rules_matching(lm.model, kspec)
                row = {"layer": name, "rank": rank, "residual": residual}
                for label, spec in (("kronecker", kspec), ("svd", sspec)):
                    m = copy.deepcopy(lm.model)
                    rep = layerzip.compress(m, spec, calibration=calib, holdout=held,
                                            progress=False)
                    r = rep.rows[0]
                    row[f"{label}_params"] = r.params_after
                    row[f"{label}_output_error"] = r.output_error
                    row[f"{label}_details"] = {k: v for k, v in r.details.items()
                                               if k in ("factors", "rank", "residual_nnz")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    model_rows = []
    if not args.skip_model:
        dense = perplexity(lm.model, ppl_windows)
        model_rows.append({"config": "dense", "perplexity": dense})
        for rank, residual in ((1, False), (4, False), (4, True)):
            kspec = {"rules": [{"targets": [ALL], "method": "kronecker",
                                "params": kron_params(rank, residual)}]}
            for label, spec in (("kronecker", kspec), ("svd", None)):
                m = copy.deepcopy(lm.model)
                spec = spec or svd_rules_matching(lm.model, kspec)
                rep = layerzip.compress(m, spec, progress=False)
                model_rows.append({"config": f"{label} (kron r={rank}"
                                             f"{', +1% residual' if residual else ''} budget)",
                                   "params_after": rep.totals()["params_after"],
                                   "params_before": rep.totals()["params_before"],
                                   "perplexity": perplexity(m, ppl_windows)})
                print(json.dumps(model_rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": "python benchmarks/"
                                                    "kronecker_vs_lowrank.py", "layers": rows,
                                                    "model": model_rows}, indent=2) + "\n")
    lines = ["| layer | kron rank | residual | params (both) | kronecker out err | svd out err |"
             " winner |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        win = "kronecker" if r["kronecker_output_error"] < r["svd_output_error"] else "svd"
        lines.append(f"| {r['layer']} | {r['rank']} | {'1%' if r['residual'] else '—'} | "
                     f"{r['kronecker_params']:,} / {r['svd_params']:,} | "
                     f"{r['kronecker_output_error']:.4f} | {r['svd_output_error']:.4f} | {win} |")
    if model_rows:
        lines += ["", "| whole model | params of replaced layers | perplexity |", "|---|---|---|"]
        for r in model_rows:
            lines.append(f"| {r['config']} | {r.get('params_after', '—')} | "
                         f"{r['perplexity']:.4g} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
