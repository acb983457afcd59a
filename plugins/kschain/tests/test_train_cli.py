import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from layerzip_kschain import chain_dense
from layerzip_kschain.cli import main
from layerzip_kschain.train import EXIT_AFTER_EPOCH_ENV, TrainConfig, TrainError, load_trained, \
    load_weight, train
from layerzip.testing import decaying_weight


@pytest.fixture
def weight_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(decaying_weight(48, 32, decay=0.95), path)
    return path


def cfg(weight_file, out, **kw):
    base = dict(weight_path=str(weight_file), rank=2, num_epochs=4, num_samples=512,
                batch_size=64, lr=1e-2, output_dir=str(out), init="random", seed=7)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_validation_loss(weight_file, tmp_path):
    result = train(cfg(weight_file, tmp_path / "a"))
    val = [h["val_loss"] for h in result.history]
    assert len(val) == 5 and val[-1] < 0.7 * val[0]
    assert result.best_val == min(val[1:])


def test_closed_form_start_is_already_better_than_random_training(weight_file, tmp_path):
    closed = train(cfg(weight_file, tmp_path / "c", init="closed_form", num_epochs=0))
    rand = train(cfg(weight_file, tmp_path / "r"))
    assert closed.history[0]["val_loss"] < rand.history[-1]["val_loss"]


def test_resume_after_kill_equals_an_uninterrupted_run(weight_file, tmp_path):
    args = ["--weight_path", str(weight_file), "--rank", "2", "--num_epochs", "4",
            "--num_samples", "512", "--batch_size", "64", "--lr", "1e-2", "--init", "random",
            "--scheduler", "cosine", "--optimizer", "adamw", "--weight_decay", "1e-4",
            "--max_grad_norm", "1.0", "--seed", "3"]
    run = [sys.executable, "-m", "layerzip_kschain.cli", "train"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    subprocess.run(run + args + ["--output_dir", str(whole)], check=True, capture_output=True)
    killed = subprocess.run(run + args + ["--output_dir", str(part)], capture_output=True,
                            env={**os.environ, EXIT_AFTER_EPOCH_ENV: "2"})
    assert killed.returncode == 75, killed.stderr.decode()
    assert not (part / "kschain_final.json").exists()
    assert json.loads((part / "kschain_resume.json").read_text())["epoch"] == 2
    subprocess.run(run + args + ["--output_dir", str(part), "--resume"], check=True,
                   capture_output=True)
    a, b = load_trained(whole / "kschain_final"), load_trained(part / "kschain_final")
    for fa, fb in zip(a.factors, b.factors):
        assert torch.equal(fa, fb)
    log_a = json.loads((whole / "kschain_training_log.json").read_text())["history"]
    log_b = json.loads((part / "kschain_training_log.json").read_text())["history"]
    assert log_a == log_b


def test_cli_end_to_end_on_a_safetensors_file(tmp_path, capsys):
    w = decaying_weight(48, 32, decay=0.9)
    save_file({"mlp.weight": w, "mlp.bias": torch.zeros(48)}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    rc = main(["train", "--weight_path", str(tmp_path / "w.safetensors"), "--rank", "3",
               "--num_epochs", "2", "--num_samples", "256", "--output_dir", str(out),
               "--save_interval", "1", "--save_prefix", "mlp", "--bs_last", "--dtype",
               "bfloat16", "--scheduler", "step", "--step_size", "1", "--log_interval", "2",
               "--log_grad_norm"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "dense 1,536 params vs KS" in printed and "smaller" in printed and "MiB saved" in printed
    names = sorted(p.name for p in out.iterdir())
    for kind in ("best", "final", "epoch_1", "epoch_2"):
        assert f"mlp_{kind}.safetensors" in names and f"mlp_{kind}.json" in names
    assert "mlp_training_log.json" in names and not [n for n in names if n.endswith(".tmp")]
    meta = json.loads((out / "mlp_final.json").read_text())
    assert meta["impl"] == "bmm" and meta["bs_last"] is True and meta["patterns"]
    assert meta["compression"]["ks_params"] < meta["compression"]["dense_params"]
    log = json.loads((out / "mlp_training_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [0, 1, 2]
    assert log["history"][2]["lr"] == pytest.approx(log["history"][1]["lr"] * 0.5)
    module = load_trained(out / "mlp_final")
    with torch.no_grad():
        rel = (module.dense_weight() - w).norm() / w.norm()
    assert rel == pytest.approx(log["history"][-1]["val_rel_error"], rel=0.3)
    assert torch.allclose(module.dense_weight(), chain_dense(
        [f.detach() for f in module.factors], module.patterns)[:48, :32])


def test_bad_inputs_get_clear_errors(tmp_path, capsys):
    torch.save({"a": torch.ones(3, 3), "b": torch.ones(2, 2)}, tmp_path / "two.pt")
    torch.save(torch.ones(3), tmp_path / "vec.pt")
    (tmp_path / "w.npy").write_bytes(b"x")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TrainError, match="pick one with --weight_key"):
        load_weight(tmp_path / "two.pt")
    assert load_weight(tmp_path / "two.pt", "a").shape == (3, 3)
    with pytest.raises(TrainError, match="2-D floating-point tensor"):
        load_weight(tmp_path / "vec.pt")
    with pytest.raises(TrainError, match=r"expected a \.pt, \.pth or \.safetensors"):
        load_weight(tmp_path / "w.npy")
    with pytest.raises(TrainError, match="weights_only=True"):
        load_weight(tmp_path / "evil.pt")
    with pytest.raises(TrainError, match="does not exist"):
        load_weight(tmp_path / "missing.pt")
    w = tmp_path / "w.pt"
    torch.save(torch.randn(8, 8), w)
    with pytest.raises(TrainError, match="--val_split must be in"):
        train(TrainConfig(str(w), val_split=1.5, output_dir=str(tmp_path)))
    assert main(["train", "--weight_path", str(w), "--patterns", "[[1,2,2,2],[2,2,3,1]]",
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "consecutive patterns must chain" in capsys.readouterr().out
