"""Where the decode kernel's fixed cost goes (GPU; a diagnostic). Per call inside a CUDA graph,
back to back over distinct weight copies (``graph_time``), as in lowrank_decode_tune.py: the
whole kernel, each phase alone (same tiles, same dependent launch; phase 1 alone skips the grid
barrier, phase 2 alone reads a stale h), an empty kernel with the same grid and dependent
launch (the floor of a launch inside a graph), and dense cuBLAS. Timings only: the partial
variants compute nothing useful.

    python3 lowrank_decode_anatomy.py --out $OUT/lowrank_decode_anatomy
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from layerzip.bench import graph_time, wake_gpu
from layerzip_lowrank.decode_kernel import _DECODE, _scratch_for, plan

from lowrank_cases import make_case, weight_copies
from probe_runs import decode_probe_start, write_rows

SHAPES = [(16, 4096, 4096, 256), (16, 4096, 11008, 256)]


@triton.jit
def _empty_kernel(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launcher(x, u, v, b, phase: int, p: dict, g: int):
    h, counter = _scratch_for(x.device, p["BT"], p["RP"], g, False, p["HBUF"])
    t, n = x.shape
    m, r = u.shape
    y = torch.empty((t, m), device=x.device, dtype=x.dtype)
    meta = {k: p[k] for k in ("BT", "KC", "BR", "BN", "BK2", "RP", "HBUF", "ZB")}

    def run():
        _DECODE((g,), x, v, u, b, h, y, counter, counter, t, n, m, r, p["N_RB"], p["N_UNITS"],
                p["N_TILES"], p["TW"], g, x.stride(0), x.stride(1), v.stride(0), v.stride(1),
                u.stride(0), u.stride(1), y.stride(0), y.stride(1), HAS_BIAS=True,
                PHASE=phase, PREFETCH=p["PREFETCH"] if phase != 1 else 0, PDL=True,
                ENDS_CALL=False, TRACE=False, **meta, num_warps=p["warps"], launch_pdl=True)
    return run


def main() -> None:
    out, g, rows = decode_probe_start()
    for t, n, m, r in SHAPES:
        x, w, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
        p = plan(t, n, m, r, g)
        uvs = weight_copies(u, v)
        ws = [w_ for (w_,) in weight_copies(w)]
        from layerzip_lowrank.decode_kernel import lowrank_decode
        variants = {
            "dense": [lambda w=w_: F.linear(x, w, b) for w_ in ws],
            "whole kernel": [lambda u=u_, v=v_: lowrank_decode(x, u, v, b) for u_, v_ in uvs],
            "phase 1 alone": [launcher(x, u_, v_, b, 1, p, g) for u_, v_ in uvs],
            "phase 2 alone": [launcher(x, u_, v_, b, 2, p, g) for u_, v_ in uvs],
            "empty kernel, same grid": [lambda: _empty_kernel[(g,)](PDL=True, launch_pdl=True)],
            "empty kernel, no dependent launch": [lambda: _empty_kernel[(g,)](PDL=False)],
        }
        with torch.no_grad():
            for name, fns in variants.items():
                for fn in fns:
                    fn()
                wake_gpu()
                timing = graph_time(fns, rounds=50)
                rows.append({"shape": f"T={t} {n}→{m} r={r}", "what": name,
                             "us": timing.median * 1e6})
                print(json.dumps(rows[-1]), flush=True)
        del uvs, ws
        torch.cuda.empty_cache()
    write_rows(out + ".jsonl", rows)


if __name__ == "__main__":
    main()
