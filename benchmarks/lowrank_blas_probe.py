"""Do cuBLASLt, or the intermediate h stored column-major, move the prefill two-GEMM's time?
(GPU; a diagnostic.) torch routes a bf16 GEMM through cuBLAS or cuBLASLt
(``torch.backends.cuda.preferred_blas_library``), and cuBLAS picks its kernel by the operands'
layouts: the second GEMM (a reduction over r only, writing all of y) runs at about 75% of the
tensor cores' rate with h row-major, and might pick a better kernel reading h as hᵀ's
transpose. Each entry, under each library: per call inside a CUDA graph (``graph_time``) and
eager, T = 8192, bf16, one process.

    python3 lowrank_blas_probe.py --out $OUT/lowrank_blas_probe
    python3 lowrank_blas_probe.py --report lowrank_blas_probe.jsonl
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank_cases import probe_inputs
from probe_runs import probe_main, report_tables

CASES = [(8192, 4096, 4096, 256), (8192, 4096, 4096, 512), (8192, 4096, 11008, 256)]
LIBRARIES = ("cublas", "cublaslt")


def probe_case(t, n, m, r, record) -> None:
    x, w, u, v, b, ref_h, ref_y = probe_inputs(t, n, m, r)
    vt = v.t().contiguous()   # (r, n): F.linear(x, vt) is the shipped first GEMM
    ref_dense = x.double() @ w.double().t() + b.double()
    previous = torch.backends.cuda.preferred_blas_library()
    try:
        for lib in LIBRARIES:
            torch.backends.cuda.preferred_blas_library(lib)
            h = F.linear(x, vt)                # (T, r), row-major
            h_t = torch.mm(vt, x.t())          # (r, T): h stored column-major
            record((t, n, m, r), f"{lib}: dense", lambda: F.linear(x, w, b), ref_dense)
            record((t, n, m, r), f"{lib}: two GEMMs, h row-major",
                   lambda: F.linear(F.linear(x, vt), u, b), ref_y)
            record((t, n, m, r), f"{lib}:   x·V → h", lambda: F.linear(x, vt), ref_h)
            record((t, n, m, r), f"{lib}:   h·Uᵀ + b", lambda: F.linear(h, u, b), ref_y)
            record((t, n, m, r), f"{lib}:   h·Uᵀ", lambda: F.linear(h, u), ref_y - b.double())
            record((t, n, m, r), f"{lib}: two GEMMs, h column-major",
                   lambda: F.linear(torch.mm(vt, x.t()).t(), u, b), ref_y)
            record((t, n, m, r), f"{lib}:   Vᵀ·xᵀ → hᵀ", lambda: torch.mm(vt, x.t()),
                   ref_h.t())
            record((t, n, m, r), f"{lib}:   (hᵀ)ᵀ·Uᵀ + b", lambda: F.linear(h_t.t(), u, b),
                   ref_y)
            record((t, n, m, r), f"{lib}:   (hᵀ)ᵀ·Uᵀ", lambda: F.linear(h_t.t(), u),
                   ref_y - b.double())
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def report(path: str) -> str:
    """The tables, with each whole forward's GPU speedup over the same library's dense."""
    def vs_dense(case, rows, what, row):
        dense = rows.get(f"{what.split(':')[0]}: dense", {}).get("graph_ms")
        if not isinstance(dense, float) or "two GEMMs" not in what:
            return [""]
        return [f"{dense / row['graph_ms']:.2f}×"]
    return report_tables(path, ["vs the same library's dense (GPU)"], vs_dense,
                         name=lambda w: w.replace("  ", "&nbsp;&nbsp;"))


if __name__ == "__main__":
    probe_main(CASES, probe_case, report)
