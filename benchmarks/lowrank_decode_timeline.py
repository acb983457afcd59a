"""Where a decode layer's time goes when layers run back to back (GPU; a diagnostic).

A CUDA graph runs the decode kernel (triton_decode) CALLS times in a row over distinct weight
copies, as in lowrank_decode_tune.py, and every program of every call writes a trace
(``lowrank_decode(..., trace=)``): its SM, the global timer at its start and end, and its SM's
cycle counter at its start, after waiting for the layer before (``gdc_wait``), on arriving at
the grid barrier (phase 1's atomics done), on leaving it, and after its stores. Each SM's
cycle counter is put on the global clock by the offset that fits its programs' start stamps
best (the global timer is coarse; the offset is a median over every call on that SM).

Per call, medians over programs, in µs, relative to the previous call's last "end" stamp
(after a program's stores, before its exit and, with one h, its final arrival at the
counter):
``start`` (the program began: a dependent launch starts before the previous call ends),
``waited`` (gdc_wait returned), ``arrived``, ``left`` (the barrier), ``end``; and the period
between calls. Variants: the shipped kernel (two h alternating by call); one h (hbuf = 1:
the call's last program zeroes it after an end-of-call arrival); without the dependent launch
(pdl off); each
layer followed by an elementwise op (torch.add: no dependent launch lets it overlap); eight
warps instead of four.

    python3 lowrank_decode_timeline.py --out $OUT/lowrank_decode_timeline
"""

from __future__ import annotations

import json
import statistics

import torch
from layerzip.bench import wake_gpu
from layerzip_lowrank.decode_kernel import lowrank_decode

from lowrank_cases import make_case, weight_copies
from probe_runs import decode_probe_start, write_rows

SHAPES = [(16, 4096, 11008, 256), (16, 4096, 4096, 256), (1, 4096, 11008, 256)]
CALLS = 48
STEPS = ("start", "waited", "arrived", "left", "end")  # trace slots 2-6


def traced_run(x, uvs, b, g: int, tiles: dict, add_after: bool) -> tuple[torch.Tensor, float]:
    """CALLS calls captured in one graph, replayed (warm), then once more for the traces:
    (an int64 tensor CALLS × G × 8 on the host, µs per call of that replay)."""
    traces = torch.zeros(CALLS, g, 8, dtype=torch.int64, device="cuda")

    def step():
        y = x
        for i in range(CALLS):
            u, v = uvs[i % len(uvs)]
            y = lowrank_decode(x, u, v, b, tiles=tiles, trace=traces[i])
            if add_after:
                y = torch.add(y, 1.0)
        return y

    step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    wake_gpu()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return traces.cpu(), start.elapsed_time(stop) * 1e3 / CALLS


def timeline(traces: torch.Tensor) -> dict:
    """Per-step medians (µs) relative to the previous call's last end, from raw traces."""
    tr = traces.double()
    sm, g0, g1 = tr[..., 0].long(), tr[..., 1], tr[..., 7]
    cycles = tr[..., 2:7]
    # the SM clock rate (cycles per ns) from each program's start-to-end span in both clocks
    span_ns, span_cy = (g1 - g0).flatten(), (cycles[..., 4] - cycles[..., 0]).flatten()
    keep = span_ns > 2000  # the coarse global timer needs spans well above its tick
    rate = float((span_cy[keep] / span_ns[keep]).median()) if keep.any() else 1.98
    # per SM: global ns ≈ cycles / rate + offset, the offset a median over its programs
    offsets = {}
    for s in sm.unique().tolist():
        on = sm == s
        offsets[s] = float((g0[on] - cycles[..., 0][on] / rate).median())
    off = torch.tensor([[offsets[s] for s in row] for row in sm.tolist()], dtype=torch.float64)
    ns = cycles / rate + off[..., None]  # CALLS × G × 5, global ns
    rows = []
    for i in range(1, ns.shape[0]):
        prev_end = float(ns[i - 1, :, 4].max())
        rows.append({k: float(ns[i, :, j].median() - prev_end) / 1e3
                     for j, k in enumerate(STEPS)})
    period = [float(ns[i, :, 1].median() - ns[i - 1, :, 1].median()) / 1e3
              for i in range(1, ns.shape[0])]
    out = {k: statistics.median(r[k] for r in rows[2:]) for k in STEPS}
    out["period"] = statistics.median(period[2:])
    out["clock_ghz"] = rate
    out["programs_per_sm"] = float(torch.bincount(sm[0]).max())
    return out


def main() -> None:
    out, g, rows = decode_probe_start()
    variants = {"shipped (pdl, two h)": ({}, False),
                "pdl, one h": ({"hbuf": 1}, False), "pdl, 8 warps": ({"warps": 8}, False),
                "pdl off": ({"pdl": 0}, False), "pdl, torch.add after each": ({}, True)}
    for t, n, m, r in SHAPES:
        x, _, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
        uvs = weight_copies(u, v)
        for name, (tiles, add_after) in variants.items():
            with torch.no_grad():
                traces, us_per_call = traced_run(x, uvs, b, g, tiles, add_after)
            row = {"shape": f"T={t} {n}→{m} r={r}", "variant": name,
                   "us_per_call": us_per_call, **timeline(traces)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del uvs
        torch.cuda.empty_cache()
    write_rows(out + ".jsonl", rows)
    lines = ["| shape | variant | µs per call | period | start | waited | arrived | left | end |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['variant']} | {r['us_per_call']:.2f} | {r['period']:.2f} | "
              + " | ".join(f"{r[k]:+.2f}" for k in STEPS) + " |" for r in rows[1:]]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
