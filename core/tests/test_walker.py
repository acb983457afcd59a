import copy
import json

import pytest
import torch
from torch import nn

import layerzip
from layerzip import CompressionError, SpecError
from layerzip.models import gpt2_tiny


class MLP(nn.Module):
    def __init__(self, width=24, depth=5):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert [(n, type(m)) for n, m in model.named_modules()] == types


def spec(rank, **params):
    return {"rules": [{"targets": ["Linear"], "method": "toy_lowrank",
                       "params": {"rank": rank, **params}}]}


def test_compress_replaces_every_planned_layer(toy):
    model = MLP()
    x = torch.randn(7, 24)
    ref = model(x)
    report = layerzip.compress(model, spec(24), progress=False)
    assert all(isinstance(layer, toy.ToyLowRank) for layer in model.layers)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert len(report.rows) == 5
    row = report.rows[0]
    assert row.method == "toy_lowrank" and row.backend == "torch" and row.layer_type == "Linear"
    assert row.weight_error < 1e-5 and row.output_error is None
    data = json.loads(report.to_json())
    assert data["totals"]["layers"] == 5
    assert data["totals"]["params_before"] == 5 * (24 * 24 + 24)


def test_failure_at_third_layer_leaves_model_byte_identical(toy):
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(CompressionError) as info:
        layerzip.compress(model, spec(4, fail_at=3), progress=False)
    msg = str(info.value)
    assert "layers.2" in msg and "planned failure" in msg and "unchanged" in msg
    assert toy.ToyApproximator.calls == 3
    assert_unchanged(model, snap)


def test_failure_while_swapping_restores_every_layer(toy, monkeypatch):
    model = MLP()
    snap = snapshot(model)
    original = layerzip.LinearAdapter.replace
    count = {"n": 0}

    def flaky(self, model_, name, new):
        count["n"] += 1
        if count["n"] == 4:
            raise RuntimeError("disk on fire")
        return original(self, model_, name, new)

    monkeypatch.setattr(layerzip.LinearAdapter, "replace", flaky)
    with pytest.raises(CompressionError, match="layers.3.*unchanged"):
        layerzip.compress(model, spec(4), progress=False)
    assert_unchanged(model, snap)


def test_calibration_is_required_when_a_method_asks(toy):
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(SpecError, match="rule 0.*needs calibration data.*--calib"):
        layerzip.compress(model, spec(4, use_calibration=True), progress=False)
    assert_unchanged(model, snap)


def test_calibration_gram_is_exact_float64_and_shared_inputs(toy):
    model = MLP(depth=2)
    batches = [torch.randn(3, 5, 24) for _ in range(3)]
    held = [torch.randn(4, 24)]
    report = layerzip.compress(model, spec(8, use_calibration=True), calibration=batches,
                               holdout=held, progress=False)
    stats = toy.ToyApproximator.seen_stats[0]
    x = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    assert stats.gram.dtype == torch.float64
    torch.testing.assert_close(stats.gram, x.t() @ x)
    assert stats.count == 45
    assert stats.samples.shape == (45, 24) and stats.holdout.shape == (4, 24)
    assert report.output_error_on == "holdout"
    assert all(0 < r.output_error < 1 for r in report.rows)


def test_calibration_samples_are_bounded_and_uniform(toy):
    from layerzip.calibration import _Collector

    col = _Collector(4, want_gram=False, max_samples=10, seed=0)
    for i in range(20):
        col.add(torch.full((5, 4), float(i)), holdout=False, gram_cache={})
    assert col.stats.samples.shape == (10, 4)
    assert len(set(col.stats.samples[:, 0].tolist())) > 3, "the sample spreads over batches"


def test_calibration_batch_forms(toy):
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, x, scale=1.0):
            return self.proj(x) * scale

    s = {"rules": [{"targets": ["proj"], "method": "toy_lowrank",
                    "params": {"rank": 6, "use_calibration": True}}]}
    for batches in ([{"x": torch.randn(2, 6), "scale": 2.0}], [(torch.randn(2, 6), 3.0)],
                    [torch.randn(2, 6)]):
        m = KW()
        layerzip.compress(m, s, calibration=batches, progress=False)
        assert toy.ToyApproximator.seen_stats[-1].count == 2
    with pytest.raises(ValueError, match="calibration data is empty"):
        layerzip.compress(KW(), s, calibration=[], progress=False)


def test_gpt2_conv1d_full_rank_reproduces_dense_outputs(toy):
    model = gpt2_tiny()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    conv_spec = {"rules": [{"targets": ["Conv1D"], "method": "toy_lowrank",
                            "params": {"rank": 64}}]}
    p = layerzip.plan(model, conv_spec)
    names = [la.name for la in p.layers]
    assert "transformer.h.0.attn.c_attn" in names and len(names) == 8
    c_attn = next(la for la in p.layers if la.name.endswith("h.0.attn.c_attn"))
    assert c_attn.view.shape == (192, 64), "Conv1D stores (in, out); the view must be (out, in)"
    report = layerzip.compress(model, conv_spec, calibration=[ids], progress=False)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert max(r.weight_error for r in report.rows) < 1e-5
    assert max(r.output_error for r in report.rows) < 1e-5


def test_gpt2_conv1d_low_rank_view_is_transposed_correctly(toy):
    model = gpt2_tiny()
    conv = model.transformer.h[0].mlp.c_fc
    w_out_in = conv.weight.detach().t().clone()
    layerzip.compress(model, {"rules": [{"targets": ["transformer.h.0.mlp.c_fc"],
                                         "method": "toy_lowrank", "params": {"rank": 3}}]},
                      progress=False)
    new = model.transformer.h[0].mlp.c_fc
    u, s, vh = torch.linalg.svd(w_out_in.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(new.dense_weight().double(), best, rtol=1e-4, atol=1e-5)


def test_dtype_and_device_kept(toy):
    model = MLP().to(torch.float64)
    layerzip.compress(model, spec(4), progress=False)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(2, 24, dtype=torch.float64)).dtype == torch.float64


def test_report_table_renders(toy):
    from rich.console import Console

    report = layerzip.compress(MLP(), spec(4), progress=False)
    console = Console(record=True, width=200)
    console.print(report.to_table(max_rows=2))
    text = console.export_text()
    assert "layers.0" in text and "more" in text and "toy_lowrank" in text


def test_model_is_not_mutated_by_plan(toy):
    model = MLP()
    snap = snapshot(model)
    layerzip.plan(model, spec(4))
    assert_unchanged(model, snap)
    copy.deepcopy(model)


def test_gram_of_every_layer_is_its_own_even_when_memory_is_reused(toy):
    # Intermediates of the same shape are freed and reallocated at the same address during a
    # forward; the shared-input cache must never hand one layer another layer's Gram.
    torch.manual_seed(0)
    model = MLP(width=16, depth=8)
    batches = [torch.randn(4, 16) for _ in range(2)]
    inputs = {}

    def spy(name):
        def hook(module, args):
            inputs.setdefault(name, []).append(args[0].detach().double().reshape(-1, 16))
        return hook

    handles = [m.register_forward_pre_hook(spy(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    layerzip.compress(model, spec(4, use_calibration=True), calibration=batches, progress=False)
    grams = toy.ToyApproximator.seen_stats
    assert len(grams) == 8
    for i, stats in enumerate(grams):
        x = torch.cat(inputs[f"layers.{i}"])
        torch.testing.assert_close(stats.gram, x.t() @ x, msg=f"layer {i}")
