"""Markdown table of lowrank_prefill_probe.py's JSON lines: per case, GPU time per call (CUDA
graph) and eager time of each entry, with its speedup over dense and over the bf16 two-GEMM.

    python benchmarks/lowrank_prefill_report.py benchmarks/results/lowrank_prefill_probe.jsonl
"""

from __future__ import annotations

import sys

from probe_runs import read_cases


# whole forwards; the other entries are pieces of one (their speedups would mean nothing)
WHOLE = {"dense", "bf16_two_gemm", "persistent", "fp8_rows", "fp8_groups_in_gemm",
         "bf16_compile_max_autotune"}


def main(path: str) -> None:
    machine, cases = read_cases(path)
    out = [f"Machine: {machine}", ""]
    for (t, n, m, r), rows in cases.items():
        dense = rows["dense"]["graph_ms"]
        bf16 = rows["bf16_two_gemm"]["graph_ms"]
        out += [f"### T={t} {n}→{m} r={r}", "",
                "| what (pieces indented) | GPU µs (graph) | eager µs | vs dense | vs bf16 two-GEMM "
                "| rel. error |",
                "|---|---|---|---|---|---|"]
        for what, row in rows.items():
            if "error" in row:
                out.append(f"| {what} | failed: {row['error']} | | | | |")
                continue
            g = row["graph_ms"]
            gs = f"{g * 1e3:.1f}" if isinstance(g, float) else str(g)
            whole = isinstance(g, float) and what in WHOLE
            speed = (f"{dense / g:.2f}×", f"{bf16 / g:.2f}×") if whole else ("", "")
            err = f"{row['rel_error']:.1e}" if row.get("rel_error") is not None else ""
            name = what if what in WHOLE else f"&nbsp;&nbsp;{what}"
            out.append(f"| {name} | {gs} | {row['ms'] * 1e3:.1f} | {speed[0]} | {speed[1]} "
                       f"| {err} |")
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
