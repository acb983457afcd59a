"""The layerzip command line end to end, on the gpt2-tiny built-in (Conv1D layers)."""

import json

import pytest

from layerzip.cli import main

SPEC = """
rules:
  - targets: ["re:transformer\\\\.h\\\\.\\\\d+\\\\.mlp\\\\..*"]
    method: svd
    params: {rank: 16, whiten: true}
"""


@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(SPEC)
    return p


def test_plan_prints_layers(spec_file, capsys):
    assert main(["plan", str(spec_file), "--model", "gpt2-tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [la["name"] for la in data["layers"]] == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert data["layers"][0]["type"] == "Conv1D"
    assert data["layers"][0]["params_after"] == 16 * (64 + 256) + 256


def test_compress_then_eval(spec_file, tmp_path, capsys):
    out = tmp_path / "out"
    rj = tmp_path / "report.json"
    assert main(["compress", str(spec_file), "--model", "gpt2-tiny", "--out", str(out),
                 "--window", "64", "--calib-windows", "2", "--eval-windows", "2", "--quiet",
                 "--report-json", str(rj)]) == 0
    text = capsys.readouterr().out
    assert "layerzip report" in text and "perplexity" in text and "saved to" in text
    report = json.loads(rj.read_text())
    assert report["totals"]["layers"] == 4 and report["output_error_on"] == "holdout"
    after = report["perplexity"]["after"]
    assert main(["eval", "--model", "gpt2-tiny", "--compressed", str(out), "--window", "64",
                 "--windows", "2"]) == 0
    line = capsys.readouterr().out
    assert "perplexity of gpt2-tiny" in line
    # eval uses the same held-out windows (after the 8 default calibration windows only when
    # the window count matches); here we only check it ran on the compressed model and parsed
    assert float(line.strip().rsplit(" ", 1)[1]) > 1 and after > 1


def test_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - targets: [h]\n    method: svdd\n")
    assert main(["plan", str(bad), "--model", "gpt2-tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerzip: error:") and "did you mean 'svd'" in err
    assert "\n" not in err and "Traceback" not in err
    assert main(["plan", str(bad), "--model", "no-such-model"]) == 1
    assert "built-in name" in capsys.readouterr().err
    assert main(["eval", "--model", "gpt2-tiny", "--compressed", str(tmp_path)]) == 1
    assert "layerzip.json" in capsys.readouterr().err


def test_schema(tmp_path, capsys):
    target = tmp_path / "schema.json"
    assert main(["schema", "-o", str(target)]) == 0
    schema = json.loads(target.read_text())
    text = json.dumps(schema)
    for method in ("svd", "rsvd", "adaptive"):
        assert f'"const": "{method}"' in text
    assert "whiten" in text and "error_tolerance" in text


def test_plugins_lists_lowrank(capsys):
    assert main(["plugins", "--json"]) == 0
    data = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert data["lowrank"]["error"] is None
    assert set(data["lowrank"]["provides"]["approximators"]) == {"svd", "rsvd", "adaptive"}


def test_chat_through_a_pipe_with_a_compressed_model(tmp_path):
    import subprocess
    import sys

    spec = tmp_path / "k.yaml"
    spec.write_text("rules:\n  - targets: ['re:transformer\\.h\\.\\d+\\.mlp\\.c_fc']\n"
                    "    method: kronecker\n    params: {factors: [[16, 8], [16, 8]], rank: 4}\n")
    out = tmp_path / "out"
    assert main(["compress", str(spec), "--model", "gpt2-tiny", "--out", str(out), "--window",
                 "32", "--calib-windows", "1", "--eval-windows", "1", "--quiet"]) == 0
    proc = subprocess.run([sys.executable, "-m", "layerzip.cli", "chat", "--model", "gpt2-tiny",
                           "--compressed", str(out), "--max-tokens", "6"],
                          input="hello there\n\nsecond line\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.splitlines()
    assert len(replies) == 2, proc.stdout  # one per non-empty input line, then EOF ends it
    sampled = subprocess.run([sys.executable, "-m", "layerzip.cli", "chat", "--model",
                              "gpt2-tiny", "--max-tokens", "4", "--temperature", "0.8"],
                             input="abc\n", capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0 and len(sampled.stdout.splitlines()) == 1, sampled.stderr


def test_local_hugging_face_directory_as_model(smollm2, tmp_path, capsys):
    from layerzip.models import cache_dir

    local = cache_dir() / "smollm2-135m-instruct-fp32"  # written by the smollm2 built-in
    spec = tmp_path / "s.yaml"
    spec.write_text("rules:\n  - targets: ['model.layers.0.mlp.down_proj']\n    method: svd\n"
                    "    params: {rank: 8}\n")
    assert main(["plan", str(spec), "--model", str(local), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"][0]["name"] == "model.layers.0.mlp.down_proj"
    assert data["layers"][0]["params_after"] == 8 * (576 + 1536)
