"""What the GPU probes share: timing an entry the same way every time, keeping the rows as JSON
lines, and reading them back as one markdown table per case.

A row is {"case", "what", "ms" (eager: median of CUDA-event-timed calls), "graph_ms" (per call
inside a CUDA graph, ``graph_time``; the error text if the call cannot be captured),
"first_call_s", "rel_error"} or, when the first call raises, {"case", "what", "error"}: a probe
records what failed and goes on.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Callable, Sequence

import torch

from layerzip.bench import graph_time, machine_info, time_callable, wake_gpu


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against ``ref`` (float64)."""
    return float((out.double() - ref).norm() / ref.norm())


class ProbeRecorder:
    """``record(case, name, fn, ref)`` times ``fn`` and appends its row (printed as it comes);
    ``only`` (a regex) skips the entries whose names do not match; ``dequantize`` turns an
    output into the tensor compared with ``ref`` (e.g. e4m3 values and their scales)."""

    def __init__(self, rounds: int = 30, only: str | None = None):
        self.rounds = rounds
        self.only = only
        self.rows: list[dict] = []

    def __call__(self, case, name: str, fn: Callable[[], object], ref: torch.Tensor | None = None,
                 dequantize: Callable[[object], torch.Tensor] | None = None) -> dict | None:
        if self.only and not re.search(self.only, name):
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a probe records what failed
            return self._add({"case": case, "what": name,
                              "error": f"{type(exc).__name__}: {exc}"[:300]})
        first_s = time.perf_counter() - t0
        wake_gpu()
        eager = time_callable(fn, rounds=self.rounds, warmup=5).median * 1e3
        try:
            graphed = graph_time(fn, rounds=self.rounds).median * 1e3
        except Exception as exc:  # noqa: BLE001
            graphed = f"{type(exc).__name__}: {exc}"[:200]
        err = None
        if ref is not None:
            err = rel(dequantize(out) if dequantize else out, ref)
        return self._add({"case": case, "what": name, "ms": eager, "graph_ms": graphed,
                          "first_call_s": first_s, "rel_error": err})

    def _add(self, row: dict) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def write(self, path: str) -> None:
        """The machine's description, then every row, as JSON lines."""
        write_rows(path, [{"machine": machine_info()}, *self.rows])


def write_rows(path: str, rows: Sequence[dict]) -> None:
    """``rows`` as JSON lines."""
    with open(path, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


def decode_probe_start() -> tuple[str, int, list[dict]]:
    """What a decode probe's main() starts from: the ``--out PREFIX`` of its command line, the
    decode kernel's program count on this GPU, and its rows, the first the machine's."""
    from layerzip_lowrank.decode_kernel import _programs

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    return ap.parse_args().out, _programs(torch.device("cuda")), [{"machine": machine_info()}]


def faster(best: tuple | None, row: dict | None, choice, max_error: float) -> tuple | None:
    """(GPU ms, choice) of whichever is faster, ``best`` or this recorded ``row`` (when it was
    captured in a graph and its error is below ``max_error``): the running pick of a sweep."""
    if not row or not isinstance(row.get("graph_ms"), float) or row["rel_error"] >= max_error:
        return best
    return (row["graph_ms"], choice) if best is None or row["graph_ms"] < best[0] else best


def read_cases(path: str) -> tuple[dict, dict[tuple, dict[str, dict]]]:
    """(machine, {case: {what: row}}) of a probe's JSON lines, in recorded order."""
    lines = [json.loads(line) for line in open(path)]
    cases: dict[tuple, dict[str, dict]] = {}
    for row in lines[1:]:
        cases.setdefault(tuple(row["case"]), {})[row["what"]] = row
    return lines[0].get("machine"), cases


def report_tables(path: str, headers: Sequence[str],
                  cells: Callable[[tuple, dict[str, dict], str, dict], Sequence[str]],
                  name: Callable[[str], str] = str, what: str = "what") -> str:
    """Markdown: the machine, then per case a table of every entry's GPU µs per call (graph),
    eager µs, the columns ``headers`` filled by ``cells(case, rows of the case, what, row)``,
    and its relative error; ``name`` renders an entry's name (e.g. indents pieces) under the
    first column's header ``what``."""
    machine, cases = read_cases(path)
    out = [f"Machine: {machine}", ""]
    blank = " |" * (len(headers) + 2)
    for case, rows in cases.items():
        t, n, m, r = case
        out += [f"### T={t} {n}→{m} r={r}", "",
                f"| {what} | GPU µs (graph) | eager µs | {' | '.join(headers)} | rel. error |",
                "|---" * (len(headers) + 4) + "|"]
        for entry, row in rows.items():
            if "error" in row:
                out.append(f"| {name(entry)} | failed: {row['error'][:90]} |{blank}")
                continue
            g = row["graph_ms"]
            gs = f"{g * 1e3:.1f}" if isinstance(g, float) else str(g)
            extra = cells(case, rows, entry, row) if isinstance(g, float) else [""] * len(headers)
            err = f"{row['rel_error']:.1e}" if row.get("rel_error") is not None else ""
            out.append(f"| {name(entry)} | {gs} | {row['ms'] * 1e3:.1f} | "
                       + " | ".join(extra) + f" | {err} |")
        out.append("")
    return "\n".join(out)


def run_or_report(ap: argparse.ArgumentParser, report: Callable[[str], str]):
    """Adds ``--out PREFIX`` (run, write PREFIX.jsonl) and ``--report PATH`` (print the
    markdown of a run's .jsonl) to a script's command line and parses it: the arguments for
    a run, or None once a report is printed."""
    ap.add_argument("--out", help="run, and write the JSON lines to OUT.jsonl")
    ap.add_argument("--report", help="print the markdown tables of a run's .jsonl and stop")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return None
    if not args.out:
        ap.error("--out (run) or --report (print a run's tables) is needed")
    return args


def probe_main(cases: Sequence[tuple], probe_case: Callable[..., None],
               report: Callable[[str], str]) -> None:
    """Command line of a probe: ``--out PREFIX`` runs ``probe_case(t, n, m, r, record)`` for
    each case (``--cases 0,2`` picks some, ``--only REGEX`` some entries, ``--rounds``) and
    writes PREFIX.jsonl; ``--report PATH`` prints the markdown tables of a run."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--only", help="time only the entries whose name matches this regex")
    ap.add_argument("--cases", help="comma-separated indices into the cases (default: all)")
    args = run_or_report(ap, report)
    if args is None:
        return
    record = ProbeRecorder(args.rounds, args.only)
    picked = [cases[int(i)] for i in args.cases.split(",")] if args.cases else cases
    with torch.no_grad():
        for t, n, m, r in picked:
            probe_case(t, n, m, r, record)
            torch.cuda.empty_cache()
    record.write(args.out + ".jsonl")
