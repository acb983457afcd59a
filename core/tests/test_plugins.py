import json
from importlib import metadata

import pytest

import layerzip
from layerzip import PluginError
from layerzip.plugins import Registry, reset_registry


class Dup:
    @layerzip.hookimpl
    def register_approximators(self, register):
        import toy_plugin

        register(toy_plugin.ToyApproximator())


class NotAnApproximator:
    @layerzip.hookimpl
    def register_approximators(self, register):
        register(object())


def fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr(metadata, "entry_points",
                        lambda group=None: [e for e in eps if e.group == group])


def test_broken_entry_point_is_recorded_and_others_work(monkeypatch):
    eps = [metadata.EntryPoint("broken", "no_such_module_xyz", "layerzip"),
           metadata.EntryPoint("toy", "toy_plugin", "layerzip")]
    fake_entry_points(monkeypatch, eps)
    reset_registry()
    try:
        reg = layerzip.get_registry()
        assert "import failed" in reg.plugins["broken"].error
        assert "No module named 'no_such_module_xyz'" in reg.plugins["broken"].error
        assert reg.plugins["toy"].error is None
        assert "toy_lowrank" in reg.approximators
        from layerzip.cli import main
        import io
        import contextlib

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["plugins", "--json"]) == 0
        data = {d["name"]: d for d in json.loads(out.getvalue())}
        assert "No module named" in data["broken"]["error"]
        assert data["toy"]["provides"]["approximators"] == ["toy_lowrank"]
        fast = next(b for b in data["toy"]["backends"] if b["name"] == "fast")
        assert fast == {"op": "toy_matmul", "name": "fast", "available": False,
                        "reason": "needs an imaginary accelerator"}
    finally:
        reset_registry()


def test_allow_list(monkeypatch):
    eps = [metadata.EntryPoint("broken", "no_such_module_xyz", "layerzip"),
           metadata.EntryPoint("toy", "toy_plugin", "layerzip")]
    fake_entry_points(monkeypatch, eps)
    monkeypatch.setenv("LAYERZIP_PLUGINS", "toy")
    reset_registry()
    try:
        reg = layerzip.get_registry()
        assert "broken" not in reg.plugins and "toy" in reg.plugins
        monkeypatch.setenv("LAYERZIP_PLUGINS", "")
        reset_registry()
        assert set(layerzip.get_registry().plugins) == {"layerzip"}
    finally:
        reset_registry()


def test_name_clash_names_both_plugins(toy):
    reg = layerzip.get_registry()
    info = reg.add(Dup(), "dup")
    try:
        assert "registered by both plugin 'toy' and plugin 'dup'" in info.error
        assert reg.approximators["toy_lowrank"][1] == "toy", "the first registration stays"
        assert info.provides == {}
    finally:
        reg.remove("dup")


def test_registering_a_wrong_type_is_recorded():
    reg = Registry()
    info = reg.add(NotAnApproximator(), "wrong")
    assert "is not a layerzip.Approximator" in info.error
    assert reg.approximators == {}


def test_register_plugin_fixture(register_plugin):
    import toy_plugin

    info = register_plugin(toy_plugin, "toy-fixture")
    assert info.error is None
    assert "toy_lowrank" in layerzip.get_registry().approximators


def test_fixture_unregistered_after_test():
    assert "toy_lowrank" not in layerzip.get_registry().approximators


def test_registered_plugin_raises_on_failure():
    from layerzip.testing import registered_plugin

    with pytest.raises(PluginError, match="failed to register"):
        with registered_plugin(NotAnApproximator(), "wrong"):
            pass
    assert "wrong" not in layerzip.get_registry().plugins


def test_backend_resolution(toy):
    reg = layerzip.get_registry()
    assert reg.backend("toy_matmul").name == "torch", "auto skips the unavailable 'fast'"
    assert [b.name for b in reg.backends_for("toy_matmul")] == ["fast", "torch"]
    with pytest.raises(layerzip.SpecError, match="not available here: needs an imaginary"):
        reg.backend("toy_matmul", "fast")
    with pytest.raises(layerzip.SpecError, match="no available backend for op 'nope'"):
        reg.backend("nope")


def test_accepts_declines_calls_needing_gradients_for_non_differentiable_kernels():
    import torch

    class Raw(layerzip.Backend):
        op, name, differentiable = "x", "raw", False

    class Wrapped(Raw):
        differentiable = True

    w = torch.zeros(2, requires_grad=True)
    x = torch.zeros(2)
    assert not Raw().accepts(x, w), "a weight needing a gradient must force the reference"
    assert not Raw().accepts(x.requires_grad_(), None)
    assert Raw().accepts(torch.zeros(2), w.detach(), None)
    with torch.no_grad():
        assert Raw().accepts(x, w)
    assert Wrapped().accepts(x, w)
