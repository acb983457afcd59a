"""Kronecker-sparse chains on real SmolLM2-135M projection weights: closed-form fit against random
init + training, and against SVD at the same parameter count.

Per layer, chain length L ∈ {2, 3} and rank r: the relative weight error ‖W − Ŵ‖/‖W‖ and the
relative output error on held-out activations (inputs captured from the model on
pydoc_data.topics text: 4×256 tokens to calibrate, the next 2×256 held out). Variants:
  closed_form                     the Monarch / hierarchical projection alone
  closed_form + refine (calib)    then Adam on the output MSE over calibration inputs
  random + refine (gauss)         random init, Adam on Gaussian inputs (Frobenius objective)
  random + refine (calib)         random init, Adam on calibration inputs
  svd                             the low-rank plugin's truncated SVD with ≤ the chain's params

    .venv/bin/python benchmarks/kschain_fit.py [--steps 600 --ranks 1,2,4]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import layerzip
from layerzip.models import default_text, load_model, text_windows
from layerzip.testing import SingleLayer

LAYERS = ["model.layers.10.mlp.gate_proj", "model.layers.20.mlp.down_proj"]


def capture_inputs(model, name, windows):
    module = model.get_submodule(name)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(
        -1, a[0].shape[-1]).float()))
    with torch.no_grad():
        for w in windows:
            model(w)
    handle.remove()
    return torch.cat(seen)


def run(layer, calib, held, method, params):
    model = SingleLayer(layer)
    t = time.perf_counter()
    report = layerzip.compress(model, {"rules": [{"targets": ["layer"], "method": method,
                                                  "params": params}]},
                               calibration=[calib], holdout=[held], progress=False)
    row = report.rows[0]
    return {"params": row.params_after - (layer.bias.numel() if layer.bias is not None else 0),
            "weight_error": row.weight_error, "output_error": row.output_error,
            "fit_s": round(time.perf_counter() - t, 2), "details": row.details}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kschain_fit")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--ranks", default="1,2,4")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("smollm2")
    text = default_text()
    calib_w = text_windows(lm.tokenizer, text, 256, 4)
    held_w = text_windows(lm.tokenizer, text, 256, 2, skip_windows=4)
    rows = []
    for name in LAYERS:
        base = lm.model.get_submodule(name)
        calib = capture_inputs(lm.model, name, calib_w)
        held = capture_inputs(lm.model, name, held_w)
        m, n = base.weight.shape
        for L in (2, 3):
            for r in map(int, args.ranks.split(",")):
                variants = {
                    "closed_form": {"init": "closed_form"},
                    "closed_form + refine (calib)": {"init": "closed_form",
                                                     "refine_steps": args.steps,
                                                     "refine_inputs": "calibration",
                                                     "refine_lr": 1e-4},
                    "random + refine (gauss)": {"init": "random", "refine_steps": args.steps,
                                                "refine_lr": 3e-3},
                    "random + refine (calib)": {"init": "random", "refine_steps": args.steps,
                                                "refine_inputs": "calibration",
                                                "refine_lr": 3e-3},
                }
                chain_params = None
                for variant, extra in variants.items():
                    res = run(copy.deepcopy(base), calib, held, "ks_chain",
                              {"num_factors": L, "rank": r, **extra})
                    chain_params = res["params"]
                    rows.append({"layer": name, "shape": [m, n], "L": L, "rank": r,
                                 "variant": variant, "param_fraction": res["params"] / (m * n),
                                 **res})
                    print(json.dumps(rows[-1]), flush=True)
                svd_rank = max(1, chain_params // (m + n))
                res = run(copy.deepcopy(base), calib, held, "svd", {"rank": svd_rank})
                rows.append({"layer": name, "shape": [m, n], "L": L, "rank": r,
                             "variant": f"svd (rank {svd_rank})",
                             "param_fraction": res["params"] / (m * n), **res})
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": "python benchmarks/kschain_fit.py "
                                                    f"--steps {args.steps} --ranks {args.ranks}",
                                                    "rows": rows}, indent=1))
    lines = ["| layer | L | r | variant | params (% of dense) | weight error | held-out output "
             "error | fit s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['layer'].removeprefix('model.')} {row['shape'][0]}×{row['shape'][1]}"
                     f" | {row['L']} | {row['rank']} | {row['variant']} | "
                     f"{100 * row['param_fraction']:.1f}% | {row['weight_error']:.3f} | "
                     f"{row['output_error']:.3f} | {row['fit_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
