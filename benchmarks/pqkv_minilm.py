"""Product-quantized key-value layers on the real all-MiniLM-L6-v2 (fp32 BERT), CPU.

Layer inputs come from real sentences (pydoc_data.topics paragraphs) run through the model:
the first half of the token rows calibrate (whitening, range threshold), the second half is
held out. Per layer and config: relative output error on the held-out rows, bytes stored
(codes + codebooks + thresholds + whitening factor + bias, as saved) vs the dense layer, and
CPU latency per batch of 256 rows vs the dense layer and vs a low-rank layer of the same rank
(two GEMMs), all in the same process (median of 30 runs, 2 threads).

    .venv/bin/python benchmarks/pqkv_minilm.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from layerzip.bench import time_callable
from layerzip.models import default_text, minilm_l6
from layerzip_pqkv import ApproxKVLinear

LAYERS = ["encoder.layer.2.intermediate.dense", "encoder.layer.2.output.dense",
          "encoder.layer.4.attention.self.query"]
CONFIGS = {
    "K=16 topk torch": {"expected_K": 16},
    "K=32 topk torch": {"expected_K": 32},
    "K=64 topk torch": {"expected_K": 64},
    "K=32 topk, no whitening": {"expected_K": 32, "whiten": False},
    "K=32 topk + refine": {"expected_K": 32, "refine_exact_with_float_keys": True},
    "K=32 range torch": {"expected_K": 32, "retrieval": "range"},
    "K=32 topk faiss": {"expected_K": 32, "backend": "faiss"},
    "K=32 topk nanopq": {"expected_K": 32, "backend": "nanopq"},
    "K=32 topk, PQ values": {"expected_K": 32, "values_index_type": "PQ"},
}


def sentences(n: int) -> list[str]:
    paras = [p.strip().replace("\n", " ") for p in default_text().split("\n\n")]
    return [p for p in paras if 40 < len(p) < 400][:n]


def capture(model, tok, names, texts):
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for n in names]
    with torch.no_grad():
        for i in range(0, len(texts), 16):
            batch = tok(texts[i:i + 16], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
            mask = batch["attention_mask"].reshape(-1).bool()
            model(**batch)
            for n in names:  # keep real tokens only (no padding rows)
                seen[n][-1] = seen[n][-1][mask]
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def median_ms(fn, runs=30):
    return time_callable(fn, rounds=runs, warmup=3, device="cpu").median * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/pqkv_minilm")
    ap.add_argument("--sentences", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = minilm_l6()
    inputs = capture(model, tok, LAYERS, sentences(args.sentences))
    rows = []
    for name in LAYERS:
        lin = model.get_submodule(name)
        x = inputs[name]
        half = x.shape[0] // 2
        calib, held = x[:half], x[half:]
        batch = held[:256]
        with torch.no_grad():
            ref = lin(held)
        dense_ms = median_ms(lambda: lin(batch))
        dense_bytes = sum(t.numel() * t.element_size() for t in lin.state_dict().values())
        for label, cfg in CONFIGS.items():
            m = ApproxKVLinear.from_linear(lin, cfg)
            t0 = time.perf_counter()
            m.prepare(calib)
            fit_s = time.perf_counter() - t0
            m.eval()
            with torch.no_grad():
                err = float((m(held) - ref).norm() / ref.norm())
                kv_ms = median_ms(lambda: m(batch))
                r = m.layout["rank"]
                w = lin.weight.double()
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                a = (vh[:r].t() * s[:r]).float().contiguous()           # (n, r)
                b = u[:, :r].t().float().contiguous()                    # (r, m)
                lr_ms = median_ms(lambda: torch.addmm(lin.bias, batch @ a, b))
                lr_err = float((torch.addmm(lin.bias, held @ a, b) - ref).norm() / ref.norm())
            stored = sum(m.stored_bytes().values())
            rows.append({"layer": name, "shape": list(lin.weight.shape), "config": label,
                         "rank": r, "rel_error": err, "lowrank_same_rank_error": lr_err,
                         "bytes": stored, "dense_bytes": dense_bytes,
                         "bytes_ratio": stored / dense_bytes, "ms": kv_ms, "dense_ms": dense_ms,
                         "lowrank_ms": lr_ms, "fit_s": round(fit_s, 2),
                         "mean_keys": float(m.lookup(held)[2].sum(1).float().mean())})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": f"python benchmarks/pqkv_minilm.py --sentences {args.sentences}",
         "torch_threads": 2, "rows": rows}, indent=1))
    lines = ["| layer | config | rank r | keys/query | held-out rel. error | low-rank r error | "
             "bytes vs dense | ms / 256 rows | dense ms | low-rank ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        short = r["layer"].replace("encoder.layer.", "L").replace(".dense", "")
        lines.append(f"| {short} {r['shape'][0]}×{r['shape'][1]} | {r['config']} | {r['rank']} | "
                     f"{r['mean_keys']:.1f} | {r['rel_error']:.3f} | "
                     f"{r['lowrank_same_rank_error']:.3f} | {100 * r['bytes_ratio']:.0f}% | "
                     f"{r['ms']:.2f} | {r['dense_ms']:.2f} | {r['lowrank_ms']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
