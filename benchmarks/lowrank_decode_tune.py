"""Tile sizes of the decode kernel (triton_decode): time every configuration of a small grid,
CUDA-graph captured, against dense cuBLAS of the same layer in the same process, and check each
configuration's output against float64 (a fast wrong configuration is reported as wrong).

Each side is timed per call inside one CUDA graph that runs the layer over distinct weight
copies (layerzip.bench.graph_time; weights from memory, not L2, as in a captured model step):
a graph of a single ~10 µs call times its own replay launch, which hid the tiles' effect in
the first version of this script.

    python benchmarks/lowrank_decode_tune.py --out benchmarks/results/lowrank_decode_tune
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from layerzip.bench import graph_time, wake_gpu
from layerzip_lowrank.decode_kernel import _programs, lowrank_decode, plan
from lowrank_cases import make_case, weight_copies

SHAPES = [(16, 4096, 11008, 256), (16, 4096, 4096, 256), (1, 4096, 11008, 256)]
GRID = {"br": (64,), "kc": (64, 128, 256), "bn": (64, 128), "bk2": (64,), "warps": (4, 8),
        "prefetch": (0, 1, 2), "pdl": (1,), "split": (0, 1), "hbuf": (1, 2)}
# a layer followed by an elementwise op, per launch mode (the default: two h)
INTERLEAVED = {"pdl off": {"pdl": 0}, "pdl on": {"pdl": 1}, "pdl, split": {"pdl": 1, "split": 1},
               "pdl, one h": {"pdl": 1, "hbuf": 1}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/lowrank_decode_tune")
    ap.add_argument("--grid", type=json.loads, default=None,
                    help='JSON replacing entries of GRID, e.g. \'{"br": [64, 128]}\'')
    ap.add_argument("--shapes", type=json.loads, default=None,
                    help="JSON list of [t, n, m, r] replacing SHAPES, e.g. "
                         "'[[16, 11008, 4096, 256]]'")
    args = ap.parse_args()
    if args.grid:
        GRID.update({k: tuple(v) for k, v in args.grid.items()})
    rows, interleaved = [], []
    g = _programs(torch.device("cuda"))
    for t, n, m, r in args.shapes or SHAPES:
        x, w, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
        ref = (x.double() @ v.double()) @ u.double().t() + b.double()
        ws = [w_ for (w_,) in weight_copies(w)]
        uvs = weight_copies(u, v)
        with torch.no_grad():
            wake_gpu()
            dense = graph_time([lambda w=w_: F.linear(x, w, b) for w_ in ws], rounds=50)
            two_gemm = graph_time([lambda u=u_, v=v_: torch.addmm(b, x @ v, u.t())
                                   for u_, v_ in uvs], rounds=50)
        default = plan(t, n, m, r, g)
        for values in itertools.product(*GRID.values()):
            tiles = dict(zip(GRID, values, strict=True))
            with torch.no_grad():
                out = lowrank_decode(x, u, v, b, tiles=tiles)
                err = float((out.double() - ref).norm() / ref.norm())
                timing = graph_time([lambda u=u_, v=v_, tiles=tiles:
                                     lowrank_decode(x, u, v, b, tiles=tiles) for u_, v_ in uvs],
                                    rounds=50)
            rows.append({"shape": f"T={t} {n}→{m} r={r}", **tiles, "rel_error": err,
                         "us": timing.median * 1e6, "dense_us": dense.median * 1e6,
                         "speedup": dense.median / timing.median,
                         "torch_two_gemm_us": two_gemm.median * 1e6,
                         # the same launch as the defaults (tiles resolved by the planner)
                         "is_default": plan(t, n, m, r, g, **tiles) == default})
            print(json.dumps(rows[-1]), flush=True)
        # a programmatic dependent launch overlaps the previous kernel only if that one lets it
        # (ours do; torch's elementwise kernels between layers do not): the default tiles with
        # and without it, each layer followed by an elementwise op as in a model
        scratch = torch.empty_like(x)
        for mode, tiles in INTERLEAVED.items():
            with torch.no_grad():
                mixed = graph_time([lambda u=u_, v=v_, tiles=tiles: (
                    lowrank_decode(x, u, v, b, tiles=tiles), torch.add(x, 1, out=scratch))
                    for u_, v_ in uvs], rounds=50)
            interleaved.append({"shape": f"T={t} {n}→{m} r={r}", "mode": mode,
                                "layer_plus_add_us": mixed.median * 1e6})
            print(json.dumps(interleaved[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "gpu":
         torch.cuda.get_device_name(), "rows": rows, "interleaved": interleaved}, indent=1))
    lines = [("| shape | best tiles | best µs | speedup | default µs | default speedup | "
              "dense µs | torch two-GEMM µs |"), "|---|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape and r["rel_error"] < 1e-2]
        best = min(sel, key=lambda r: r["us"])
        dflt = next((r for r in sel if r["is_default"]), None)
        lines.append(f"| {shape} | " + ", ".join(f"{k}={best[k]}" for k in GRID) +
                     f" | {best['us']:.1f} | {best['speedup']:.2f}× | "
                     f"{dflt['us'] if dflt else float('nan'):.1f} | "
                     f"{dflt['speedup'] if dflt else float('nan'):.2f}× | "
                     f"{best['dense_us']:.1f} | {best['torch_two_gemm_us']:.1f} |")
    lines += ["", "Default tiles, each layer followed by an elementwise op (`torch.add`) in the "
              "graph — µs per layer + op:", "", "| shape | " + " | ".join(INTERLEAVED) + " |",
              "|---|" + "---|" * len(INTERLEAVED)]
    for shape in dict.fromkeys(r["shape"] for r in interleaved):
        got = {r["mode"]: r["layer_plus_add_us"] for r in interleaved if r["shape"] == shape}
        lines.append(f"| {shape} | " + " | ".join(f"{got[k]:.1f}" for k in INTERLEAVED) + " |")
    wrong = [r for r in rows if r["rel_error"] >= 1e-2]
    lines.append(f"\n{len(rows)} configurations timed, {len(wrong)} wrong (rel. error ≥ 1e-2).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
