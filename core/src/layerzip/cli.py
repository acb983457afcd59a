"""The ``layerzip`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import LayerzipError

# Pipes and CI logs get a wide table instead of rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=160)
DEFAULT_MODEL = "smollm2"
DEFAULT_OUT = "layerzip-out"
#: compress options that only mean something for causal LMs (a model source brings its own data)
LM_DEFAULTS = {"calib": None, "window": 256, "calib_windows": 8, "eval_windows": 8}
MODEL_HELP = (f"a built-in name (default {DEFAULT_MODEL}), a local Hugging Face directory, or a "
              "model a plugin provides ('layerzip plugins' lists them)")


def default_spec_path() -> Path:
    return Path(str(resources.files("layerzip") / "default_spec.yaml"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:  # everything after '--' is for pytest ('layerzip bench')
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    args.pytest_args = passthrough
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (LayerzipError, FileNotFoundError, ValueError) as exc:
        if args.debug:
            raise
        print(f"layerzip: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerzip", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(metavar="command")

    s = sub.add_parser("plugins", help="list plugins, what they register, backend availability")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plugins)

    s = sub.add_parser("plan", help="show which layer gets which method (no computation)")
    s.add_argument("spec", nargs="?", help="spec file (default: the shipped default spec)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("compress", help="compress a model, print the report, save the result")
    s.add_argument("spec", nargs="?", help="spec file (default: the shipped default spec)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    s.add_argument("--calib", help="calibration text file (default: pydoc_data.topics text)")
    s.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    s.add_argument("--window", type=int, default=LM_DEFAULTS["window"],
                   help="tokens per calibration window")
    s.add_argument("--calib-windows", type=int, default=LM_DEFAULTS["calib_windows"])
    s.add_argument("--eval-windows", type=int, default=LM_DEFAULTS["eval_windows"],
                   help="held-out windows for perplexity (0 to skip)")
    s.add_argument("--report-json", help="also write the report as JSON here")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("eval", help="perplexity of a causal LM (optionally a compressed one)")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--compressed", help="directory written by 'layerzip compress --out'")
    s.add_argument("--text", help="text file (default: held-out pydoc_data.topics text)")
    s.add_argument("--window", type=int, default=256)
    s.add_argument("--windows", type=int, default=8)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("chat", help="generate with a (compressed) causal LM, one reply per "
                                    "line read from stdin until EOF")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--compressed", help="directory written by 'layerzip compress --out'")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("bench", help="run a benchmark suite; write JSON, a markdown table, plots")
    s.add_argument("suite", help="suite name: benchmarks/test_<suite>*.py (e.g. lowrank)")
    s.add_argument("--benchmarks-dir", default="benchmarks", help="the repository's benchmarks/")
    s.add_argument("--out", help="results directory (default: <benchmarks-dir>/results)")
    s.add_argument("--smoke", action="store_true", help="run each case once, no timing stats")
    s.set_defaults(func=cmd_bench)  # arguments after '--' go to pytest

    s = sub.add_parser("schema", help="write the JSON Schema of specs for the installed plugins")
    s.add_argument("-o", "--output", help="file to write (default: stdout)")
    s.set_defaults(func=cmd_schema)
    return p


# -- commands ---------------------------------------------------------------------------------
def cmd_plugins(args) -> int:
    from .plugins import get_registry

    reg = get_registry()
    data = []
    for info in reg.plugins.values():
        backends = []
        for label in info.provides.get("backends", []):
            op, name = label.split(":", 1)
            ok, why = reg.backends[(op, name)][0].available()
            backends.append({"op": op, "name": name, "available": ok, "reason": why or None})
        data.append({"name": info.name, "distribution": info.distribution,
                     "version": info.version, "error": info.error,
                     "provides": info.provides, "backends": backends})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    t = Table(title="layerzip plugins")
    for col in ("plugin", "distribution", "version", "provides", "status"):
        t.add_column(col)
    for d in data:
        provides = "\n".join(f"{k}: {', '.join(v)}" for k, v in d["provides"].items()
                             if k != "backends")
        for b in d["backends"]:
            mark = "[green]✓[/]" if b["available"] else f"[red]✗[/] {b['reason']}"
            provides += f"\nbackend {b['op']}:{b['name']} {mark}"
        status = f"[red]error: {d['error']}[/]" if d["error"] else "[green]loaded[/]"
        t.add_row(d["name"], d["distribution"] or "", d["version"] or "", provides.strip(),
                  status)
    console.print(t)
    return 0


def _model_source(ref: str):
    """The plugin-registered source named ``ref``, or None for built-ins and local paths."""
    from .plugins import get_registry

    return get_registry().model_source(ref)


def _spec_for(args, source=None):
    if args.spec:
        return args.spec
    if source is None:
        return default_spec_path()
    spec = source.default_spec()
    if spec is None:
        raise LayerzipError(f"model {source.name!r} has no default spec: give a spec file")
    return spec


def cmd_plan(args) -> int:
    from .models import load_model
    from .planning import plan

    source = _model_source(args.model)
    if source is not None:
        p = source.plan(_spec_for(args, source))
    else:
        p = plan(load_model(args.model).model, _spec_for(args))
    if args.json:
        print(json.dumps({"layers": [{"name": la.name, "type": la.layer_type, "method": la.method,
                                      "backend": la.rule.backend, "params": la.before.params,
                                      "params_after": la.after.params,
                                      "flops_after": la.after.flops_per_token}
                                     for la in p.layers], "totals": p.totals()}, indent=2))
    else:
        console.print(p.to_table())
    return 0


def cmd_compress(args) -> int:
    from .checkpoint import save
    from .evaluate import perplexity
    from .models import default_text, load_model, text_windows
    from .walker import compress

    source = _model_source(args.model)
    if source is not None:
        return _compress_source(args, source)
    spec = _spec_for(args)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    console.print(f"model [bold]{loaded.name}[/] loaded in {time.perf_counter() - t0:.1f}s")
    calib_text = Path(args.calib).read_text(encoding="utf-8") if args.calib else default_text()
    tok = loaded.tokenizer
    calib = text_windows(tok, calib_text, args.window, args.calib_windows)
    # Held-out windows come after the calibration windows (or from the default text when the
    # calibration came from a file), so reported errors are never measured on fitting data.
    eval_text, skip = (default_text(), 0) if args.calib else (calib_text, args.calib_windows)
    held = text_windows(tok, eval_text, args.window, args.eval_windows, skip_windows=skip) \
        if args.eval_windows else []
    ppl_before = perplexity(loaded.model, held) if held else None
    report = compress(loaded.model, spec, calibration=calib, holdout=held[:2] or None,
                      progress=False if args.quiet else None)
    ppl_after = perplexity(loaded.model, held) if held else None
    console.print(report.to_table(max_rows=40))
    out = save(loaded.model, args.out)
    tot = report.totals()
    summary = Table(title=f"{loaded.name}: summary", show_header=False)
    summary.add_row("model parameters", f"{tot['model_params_before']:,} → "
                    f"{tot['model_params_after']:,} "
                    f"({1 - tot['model_params_after'] / tot['model_params_before']:.1%} removed)")
    summary.add_row("replaced layers' parameters", f"{tot['params_before']:,} → "
                    f"{tot['params_after']:,} "
                    f"({1 - tot['params_after'] / max(tot['params_before'], 1):.1%} removed)")
    if held:
        summary.add_row(f"perplexity (held-out, {len(held)}×{args.window} tokens)",
                        f"{ppl_before:.2f} → {ppl_after:.2f}")
    summary.add_row("saved to", str(out))
    console.print(summary)
    if args.report_json:
        data = report.to_dict()
        data["perplexity"] = {"before": ppl_before, "after": ppl_after}
        Path(args.report_json).write_text(json.dumps(data, indent=2))
    return 0


def _compress_source(args, source) -> int:
    lm_only = [f"--{k.replace('_', '-')}" for k, default in LM_DEFAULTS.items()
               if getattr(args, k) != default]
    if lm_only:
        raise LayerzipError(f"{', '.join(lm_only)} {'is' if len(lm_only) == 1 else 'are'} for "
                            f"causal LMs; model {source.name!r} brings its own data")
    outcome = source.compress(_spec_for(args, source), args.out,
                              progress=False if args.quiet else None)
    console.print(outcome.report.to_table(max_rows=40))
    summary = Table(title=f"{source.name}: summary")
    for col in ("", "before", "after", "change"):
        summary.add_column(col, justify="left" if not col else "right")
    for m in outcome.metrics:
        change = "" if m.before is None or m.after is None else f"{m.after - m.before:+.4g}"
        summary.add_row(m.name + (f" ({m.better} is better)" if m.better else ""),
                        _num(m.before), _num(m.after), change)
    if outcome.saved:
        summary.add_row("saved to", "", str(outcome.saved), "")
    console.print(summary)
    for note in outcome.notes:
        console.print(f"note: {note}")
    if args.report_json:
        data = outcome.report.to_dict()
        data["metrics"] = [vars(m) for m in outcome.metrics]
        data["notes"] = outcome.notes
        Path(args.report_json).write_text(json.dumps(data, indent=2))
    return 0


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def cmd_eval(args) -> int:
    from .checkpoint import load
    from .evaluate import perplexity
    from .models import default_text, load_model, text_windows

    loaded = load_model(args.model)
    if args.compressed:
        load(loaded.model, args.compressed)
    if args.text:
        windows = text_windows(loaded.tokenizer, Path(args.text).read_text(encoding="utf-8"),
                               args.window, args.windows)
    else:  # the same held-out windows 'compress' reports on
        windows = text_windows(loaded.tokenizer, default_text(), args.window, args.windows,
                               skip_windows=8)
    ppl = perplexity(loaded.model, windows)
    what = f"{loaded.name}" + (f" + {args.compressed}" if args.compressed else "")
    print(f"perplexity of {what} on {len(windows)}×{args.window} tokens: {ppl:.3f}")
    return 0


def cmd_chat(args) -> int:
    import torch

    from .checkpoint import load
    from .models import load_model

    if args.max_tokens < 1 or args.temperature < 0:
        raise LayerzipError("--max-tokens must be ≥ 1 and --temperature ≥ 0")
    loaded = load_model(args.model)
    if args.compressed:
        load(loaded.model, args.compressed)
    model, tok = loaded.model, loaded.tokenizer
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{loaded.name}{' + ' + args.compressed if args.compressed else ''}: type a "
              "message, Ctrl-D to quit", file=sys.stderr)
    torch.manual_seed(args.seed)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if not message.strip():
            continue
        chat = getattr(tok, "chat_prompt", None)
        ids = (chat(message) if chat else None) or tok.encode(message)
        input_ids = torch.tensor([list(ids)], device=next(model.parameters()).device)
        sample = args.temperature > 0
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=args.max_tokens, do_sample=sample,
                                 temperature=args.temperature if sample else None,
                                 top_k=args.top_k if sample else None,
                                 pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        print(tok.decode(out[0, input_ids.shape[1]:].tolist()).strip(), flush=True)
    return 0


def cmd_bench(args) -> int:
    import subprocess

    bdir = Path(args.benchmarks_dir).resolve()
    files = sorted(bdir.glob(f"test_{args.suite}*.py"))
    if not files:
        known = sorted({p.stem.removeprefix("test_").split("_")[0]
                        for p in bdir.glob("test_*.py")})
        raise LayerzipError(f"no benchmark suite {args.suite!r} in {bdir} (suites: "
                            f"{', '.join(known) or 'none'})")
    out = Path(args.out).resolve() if args.out else bdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.suite
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={stem.with_suffix('.json')}"]
    if args.smoke:
        cmd.append("--benchmark-disable")
    rc = subprocess.call(cmd + args.pytest_args, cwd=bdir)
    if rc != 0:
        print(f"layerzip: benchmark run exited with {rc}", file=sys.stderr)
        return rc
    if not args.smoke:
        rc = subprocess.call([sys.executable, str(bdir / "report.py"),
                              str(stem.with_suffix(".json")), "--out", str(stem)], cwd=bdir)
    return rc


def cmd_schema(args) -> int:
    from .spec import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
