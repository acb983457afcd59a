"""The regression gate works: a saved baseline, then a deliberate slowdown, makes
`--benchmark-compare-fail=median:10%` fail (and an unchanged run passes)."""

import subprocess
import sys
import textwrap


def run(tmp_path, delay, *extra):
    (tmp_path / "test_gate_case.py").write_text(textwrap.dedent(f"""
        import time
        from layerzip.bench import pedantic

        def test_case(benchmark):
            pedantic(benchmark, lambda: time.sleep({delay}), rounds=5, warmup=1)
    """))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "test_gate_case.py", "-q", "-p", "no:cacheprovider",
         "--benchmark-storage=file://" + str(tmp_path / "storage"), *extra],
        cwd=tmp_path, capture_output=True, text=True)


def test_compare_fails_on_a_slowdown_and_passes_otherwise(tmp_path):
    base = run(tmp_path, 0.01, "--benchmark-autosave")
    assert base.returncode == 0, base.stdout + base.stderr
    same = run(tmp_path, 0.01, "--benchmark-compare=0001", "--benchmark-compare-fail=median:50%")
    assert same.returncode == 0, same.stdout + same.stderr
    slow = run(tmp_path, 0.03, "--benchmark-compare=0001", "--benchmark-compare-fail=median:10%")
    assert slow.returncode != 0
    assert "Performance has regressed" in slow.stdout + slow.stderr


def test_layerzip_bench_cli_smoke(tmp_path):
    from pathlib import Path

    from layerzip.cli import main

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    assert main(["bench", "lowrank", "--benchmarks-dir", str(bench_dir), "--out",
                 str(tmp_path), "--", "-k", "cpu_smoke"]) == 0
    assert (tmp_path / "lowrank.json").is_file()
    table = (tmp_path / "lowrank.md").read_text()
    assert "cpu_smoke T=64 256→256 r=16" in table and "speedup" in table
    assert main(["bench", "nosuch", "--benchmarks-dir", str(bench_dir)]) == 1
