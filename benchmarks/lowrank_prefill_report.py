"""Markdown table of lowrank_prefill_probe.py's JSON lines: per case, GPU time per call (CUDA
graph) and eager time of each entry, with its speedup over dense and over the bf16 two-GEMM.

    python benchmarks/lowrank_prefill_report.py benchmarks/results/lowrank_prefill_probe.jsonl
"""

from __future__ import annotations

import sys

from probe_runs import report_tables


# whole forwards; the other entries are pieces of one (their speedups would mean nothing)
WHOLE = {"dense", "bf16_two_gemm", "persistent", "fp8_rows", "fp8_groups_in_gemm",
         "bf16_compile_max_autotune"}


def main(path: str) -> None:
    def speedups(case, rows, what, row):
        if what not in WHOLE:
            return ["", ""]
        g = row["graph_ms"]
        return [f"{rows[base]['graph_ms'] / g:.2f}×" for base in ("dense", "bf16_two_gemm")]

    print(report_tables(path, ["vs dense", "vs bf16 two-GEMM"], speedups,
                        name=lambda what: what if what in WHOLE else f"&nbsp;&nbsp;{what}",
                        what="what (pieces indented)"))


if __name__ == "__main__":
    main(sys.argv[1])
