import json

import pytest
import torch

import layerzip
from layerzip import CheckpointError
from layerzip.models import gpt2_tiny

SPEC = {"rules": [{"targets": ["re:transformer\\.h\\.\\d+\\.mlp\\..*"], "method": "toy_lowrank",
                   "params": {"rank": 5}}]}


@pytest.fixture
def saved(toy, tmp_path):
    model = gpt2_tiny()
    layerzip.compress(model, SPEC, progress=False)
    layerzip.save(model, tmp_path / "ck")
    return model, tmp_path / "ck"


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    ids = torch.randint(0, 256, (2, 9))
    fresh = gpt2_tiny(seed=123)  # different base weights: the checkpoint must win
    layerzip.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    manifest = json.loads((path / "layerzip.json").read_text())
    assert set(manifest["layers"]) == {f"transformer.h.{i}.mlp.{p}" for i in range(2)
                                       for p in ("c_fc", "c_proj")}
    entry = manifest["layers"]["transformer.h.0.mlp.c_fc"]
    assert entry["method"] == "toy_lowrank" and entry["adapter"] == "gpt2-conv1d"
    assert entry["config"]["rank"] == 5 and manifest["specs"][0] == layerzip.Spec.parse(
        SPEC).to_dict()
    # a loaded model can be saved again
    layerzip.save(fresh, path.parent / "again")
    assert json.loads((path.parent / "again" / "layerzip.json").read_text())["layers"] == \
        manifest["layers"]


def test_no_pickle_in_checkpoint(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["layerzip.json", "model.safetensors"]


def assert_load_fails(path, match, model=None):
    model = model or gpt2_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(CheckpointError, match=match):
        layerzip.load(model, path)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_tensor_file(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert_load_fails(path, "does not match the SHA-256")


def test_corrupted_manifest(saved):
    _, path = saved
    (path / "layerzip.json").write_text('{"format": "layerzip/1", "layers": {')
    assert_load_fails(path, "not valid JSON")


def test_missing_directory(tmp_path):
    assert_load_fails(tmp_path / "nope", "does not exist")


def test_wrong_architecture(saved):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, path = saved
    other = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=1,
                                       n_head=2))
    assert_load_fails(path, "lacks|does not fit|but the given model", other)


def test_altered_tensors_without_verification_still_checked(saved):
    _, path = saved
    manifest = json.loads((path / "layerzip.json").read_text())
    manifest["layers"]["transformer.h.0.mlp.c_fc"]["config"]["rank"] = 7
    (path / "layerzip.json").write_text(json.dumps(manifest))
    model = gpt2_tiny()
    with pytest.raises(CheckpointError, match="could not be loaded|does not fit"):
        layerzip.load(model, path)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"


def test_missing_plugin_names_what_to_install(saved):
    _, path = saved
    manifest = json.loads((path / "layerzip.json").read_text())
    for entry in manifest["layers"].values():
        entry["method"] = "kronecker_from_the_future"
    (path / "layerzip.json").write_text(json.dumps(manifest))
    assert_load_fails(path, "unknown method 'kronecker_from_the_future'.*install the plugin")


def test_save_is_atomic_on_failure(toy, tmp_path, monkeypatch):
    model = gpt2_tiny()
    layerzip.compress(model, SPEC, progress=False)
    layerzip.save(model, tmp_path)
    good = (tmp_path / "model.safetensors").read_bytes()
    import layerzip.checkpoint as ck

    def boom(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(ck, "save_model", boom)
    with pytest.raises(OSError):
        layerzip.save(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layerzip.json", "model.safetensors"]


def test_record_round_trip_and_tamper_detection(tmp_path):
    from layerzip import CheckpointError, load_record, save_record

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3)}
    save_record(tmp_path / "run" / "state", tensors, {"epoch": 2, "lr": 0.1})
    got, meta = load_record(tmp_path / "run" / "state")
    assert meta["epoch"] == 2 and meta["lr"] == 0.1 and len(meta["tensors_sha256"]) == 64
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    # a newer tensor file next to an older JSON (a torn pair) is caught
    save_record(tmp_path / "other", {"a": torch.ones(2)}, {})
    (tmp_path / "run" / "state.safetensors").write_bytes(
        (tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_record(tmp_path / "run" / "state")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_record(tmp_path / "missing")
