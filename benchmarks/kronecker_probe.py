"""Config landscape of the Kronecker Triton kernels on a GPU (a tuning aid, not a benchmark).

Times every (TB, OCC, num_warps, num_stages) of the forward and gradient kernels directly
(bypassing the autotuner) for a few shapes, next to the dense GEMM and a device-to-device copy
of the same bytes (the practical floor of a kernel that reads x once and writes y once), and
prints registers / spills / shared memory per config, so a slow config can be told from a
spilling one. Writes JSON lines to --out.

    python benchmarks/kronecker_probe.py --out $OUT/kron_probe.jsonl [--sweep] [--grad]
    python benchmarks/kronecker_probe.py --report kron_probe.jsonl --out results/kronecker_probe.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import layerzip
import torch
import triton
from layerzip.bench import graphed, host_time
from layerzip_kronecker import triton_kernel as tk
from triton.testing import do_bench

SHAPES = {  # name: (factors A, factors B, rank)
    "4096x4096_r1": ((64, 64), (64, 64), 1),
    "4096x4096_r4": ((64, 64), (64, 64), 4),
    "3072x768_r1": ((48, 24), (64, 32), 1),
}


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e-3


def report(lines: list[str], top: int = 8) -> str:
    """Markdown: per shape the dense and copy times, the fastest configs of each kernel, the
    slowest one, and the autotuned parts."""
    rows = [json.loads(line) for line in lines if line.strip()]
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        base = next((r for r in mine if "dense_s" in r), None)
        out.append(f"### {shape}\n")
        if base:
            out.append(f"dense {base['dense_s'] * 1e6:.1f} µs; device copy of the same bytes "
                       f"{base['copy_s'] * 1e6:.1f} µs\n")
        for kind in ("fwd", "grad"):
            ran = sorted((r for r in mine if r.get("kernel") == kind and "us" in r),
                         key=lambda r: r["us"])
            if not ran:
                continue
            failed = sum(1 for r in mine if r.get("kernel") == kind and "error" in r)
            out.append(f"{kind}: {len(ran)} configs ran, {failed} failed (out of resources); "
                       f"fastest {top} and the slowest:\n")
            out.append("| TB | OCC | warps | stages | µs | × dense | of copy | regs | spills "
                       "| smem |")
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for r in ran[:top] + ran[-1:]:
                out.append(f"| {r['TB']} | {r['OCC']} | {r['num_warps']} | {r['num_stages']} | "
                           f"{r['us']:.1f} | {r['vs_dense']:.2f} | {r['vs_copy']:.2f} | "
                           f"{r['regs']} | {r['spills']} | {r['smem']} |")
            out.append("")
        parts = [r for r in mine if "part" in r]
        if parts:
            out.append("| autotuned path | host µs/call | eager µs | graphed µs |")
            out.append("|---|---|---|---|")
            for r in parts:
                out.append(f"| {r['part']} | {r.get('host_us', float('nan')):.1f} | "
                           f"{r.get('eager_us', r.get('us', float('nan'))):.1f} | "
                           f"{r.get('graph_us', float('nan')):.1f} |")
            out.append("")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--report", nargs="+", help="render these JSONL files as markdown to --out")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the whole sweep")
    p.add_argument("--sweep", action="store_true", help="sweep the forward kernel's configs")
    p.add_argument("--grad", action="store_true", help="also sweep the gradient kernel")
    args = p.parse_args()
    if args.report:
        from pathlib import Path

        lines = [ln for f in args.report for ln in Path(f).read_text().splitlines()]
        Path(args.out).write_text(report(lines))
        return
    deadline = time.time() + args.budget
    with open(args.out, "w") as out:
        sweep(args, out, deadline)


def sweep(args, out, deadline: float) -> None:
    """Per shape: dense and copy times, the config sweeps asked for, the autotuned paths."""
    t = args.tokens
    dt = torch.bfloat16
    for name, ((m1, n1), (m2, n2), r) in SHAPES.items():
        x = torch.randn(t, n1 * n2, device="cuda", dtype=dt)
        a = torch.randn(r, m1, n1, device="cuda", dtype=dt) / n1 ** 0.5
        b = torch.randn(r, m2, n2, device="cuda", dtype=dt) / n2 ** 0.5
        w = torch.einsum("kij,kab->iajb", a.float(), b.float()).reshape(m1 * m2, n1 * n2).to(dt)
        y = torch.empty(t, m1 * m2, device="cuda", dtype=dt)
        dense = bench(lambda: x @ w.t())
        copy_src = torch.randn(t * (n1 * n2 + m1 * m2) // 2, device="cuda", dtype=dt)
        copy_dst = torch.empty_like(copy_src)
        floor = bench(lambda: copy_dst.copy_(copy_src))  # same bytes read + written
        ref = (x.double() @ w.double().t())
        shape = tk._shape_args(t, a, b)
        print(f"{name}: dense {dense * 1e6:.1f} us, copy of the same bytes {floor * 1e6:.1f} us")
        out.write(json.dumps({"shape": name, "dense_s": dense, "copy_s": floor}) + "\n")
        grad = args.grad and name == "4096x4096_r1"
        kernels = ([("fwd", tk._kron_fwd.fn)] if args.sweep else []) + \
            ([("grad", tk._kron_grad.fn)] if grad else [])
        for kind, fn in kernels:
            rows = []
            for tb, occ, warps, stages in itertools.product((1, 2, 4, 8), (1, 2, 4, 1000),
                                                             (4, 8), (2, 3)):
                if time.time() > deadline:
                    break
                acc = tb * shape[7] * (shape[10] + shape[9]) // (warps * 32)
                if acc > 256 or (r > 1 and tb > 2):
                    continue
                tiles = triton.cdiv(t, tb)
                progs = min(tiles, torch.cuda.get_device_properties(0).multi_processor_count * occ)
                meta = {"TB": tb, "OCC": occ, "num_warps": warps, "num_stages": stages}
                try:
                    if kind == "fwd":
                        def run():
                            return fn[(progs,)](x, a, b, y, *shape, ACCUMULATE=False, **meta)
                    else:
                        dy = torch.randn(t, m1 * m2, device="cuda", dtype=dt)
                        # one fp32 row of partial dA and dB sums per (program, term)
                        parts = torch.zeros(progs * r, shape[7] * shape[8] + shape[9] * shape[10],
                                            device="cuda")

                        def run():
                            return fn[(progs, r)](x, dy, a, b, parts, *shape, **meta)
                    k = run()
                    secs = bench(run)
                    err = None
                    if kind == "fwd":
                        y.fill_(float("nan"))
                        run()
                        err = float((y.double() - ref).norm() / ref.norm())
                    row = dict(shape=name, kernel=kind, **meta, us=secs * 1e6,
                               vs_dense=dense / secs, vs_copy=floor / secs, regs=k.n_regs,
                               spills=k.n_spills, smem=k.metadata.shared, rel_err=err)
                except Exception as e:  # noqa: BLE001 — a config that cannot run is a result
                    row = dict(shape=name, kernel=kind, **meta, error=repr(e)[:200])
                out.write(json.dumps(row) + "\n")
                out.flush()
                rows.append(row)
            best = sorted([r_ for r_ in rows if "us" in r_], key=lambda r_: r_["us"])[:6]
            for r_ in best:
                print(f"  {kind} TB={r_['TB']} OCC={r_['OCC']} w={r_['num_warps']} "
                      f"s={r_['num_stages']}: {r_['us']:.1f} us  {r_['vs_dense']:.2f}x dense  "
                      f"{r_['vs_copy']:.2f} of copy  regs {r_['regs']} spills {r_['spills']} "
                      f"smem {r_['smem']} err {r_['rel_err']}")
            print(f"  ({len(rows)} configs, {sum('error' in r_ for r_ in rows)} failed)")
        if name == "4096x4096_r1":  # the autotuned paths: host time, eager and graphed
            dy = torch.randn(t, m1 * m2, device="cuda", dtype=dt)
            at, bt = a.transpose(1, 2), b.transpose(1, 2)
            be = layerzip.get_backend("kron_matmul", "triton")
            parts = {"backend forward": lambda: be(x, a, b, None, None, None),
                     "dx": lambda: tk.kron_fused(dy, at, bt),
                     "dA,dB": lambda: tk.kron_factor_grads(x, dy, a, b)}
            for part, fn in parts.items():
                fn()
                fast = tk._FWD.fast_launches + tk._GRAD.fast_launches
                host = host_time(fn)
                fast = tk._FWD.fast_launches + tk._GRAD.fast_launches - fast
                eager, graph = bench(fn), bench(graphed(fn))
                print(f"  autotuned {part}: host {host * 1e6:.1f} us/call ({fast} fast launches),"
                      f" eager {eager * 1e6:.1f} us, graphed {graph * 1e6:.1f} us")
                out.write(json.dumps({"shape": name, "part": part, "host_us": host * 1e6,
                                      "eager_us": eager * 1e6, "graph_us": graph * 1e6}) + "\n")
            print(f"  configs: fwd {tk._kron_fwd.best_config}; grad {tk._kron_grad.best_config}")

if __name__ == "__main__":
    main()
