"""What the fast structured residuals cost in accuracy: a residual of single entries against one
of whole m2×n2 blocks of the factor grid and one of whole input columns (outlier input features;
by residual energy, or weighted by the calibration inputs' energy per feature), at the same
residual fraction, on real SmolLM2-135M weights (the speed side is
benchmarks/test_kronecker_speed.py).

Per layer and setting: relative output error on held-out activations (calibration = the first
4×256 tokens of pydoc_data.topics text, held out = the next 2×256), relative weight error and
stored parameters (indices counted).

    .venv/bin/python benchmarks/kronecker_residual_structure.py
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import layerzip
from layerzip.models import default_text, load_model, text_windows

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.gate_proj",
          "model.layers.20.mlp.down_proj", "model.layers.5.self_attn.o_proj"]
# "kind, activation": residual_score 'activation' (the calibration inputs weight each feature)
STRUCTURES = ("entries", "entries, activation", "blocks", "columns", "columns, activation")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kronecker_residual_structure")
    args = ap.parse_args()
    lm = load_model("smollm2")
    text = default_text()
    calib = text_windows(lm.tokenizer, text, 256, 4)
    held = text_windows(lm.tokenizer, text, 256, 2, skip_windows=4)
    rows = []
    for name in LAYERS:
        for rank in (1, 4):
            for frac in (0.0, 0.01, 0.05):
                for structure in (("entries",) if frac == 0 else STRUCTURES):
                    params = {"factors": "auto", "rank": rank}
                    if frac:
                        kind, _, score = structure.partition(", ")
                        params |= {"residual_fraction": frac, "residual_structure": kind,
                                   "residual_score": "activation" if score else "magnitude"}
                    m = copy.deepcopy(lm.model)
                    rep = layerzip.compress(m, {"rules": [{"targets": [name],
                                                           "method": "kronecker",
                                                           "params": params}]},
                                            calibration=calib, holdout=held, progress=False)
                    r = rep.rows[0]
                    rows.append({"layer": name, "rank": rank, "residual_fraction": frac,
                                 "structure": structure if frac else "—",
                                 "params": r.params_after, "output_error": r.output_error,
                                 "weight_error": r.details["relative_error"],
                                 "factors": r.details["factors"],
                                 "residual_nnz": r.details["residual_nnz"]})
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": "python benchmarks/kronecker_residual_structure.py", "rows": rows},
        indent=2) + "\n")
    lines = ["Made by `.venv/bin/python benchmarks/kronecker_residual_structure.py` (CPU, real "
             "SmolLM2-135M weights; factors chosen by `auto`).", "",
             "| layer | rank | residual | structure | stored params | weight err | "
             "held-out output err |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['rank']} | "
                     f"{r['residual_fraction']:.0%} | {r['structure']} | {r['params']:,} | "
                     f"{r['weight_error']:.4f} | {r['output_error']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
