"""Model sources: plugins add models to the command line, which then plans and compresses them
through the source (for models approximated while they are built, such as compiled circuits)."""

import json

import pytest
from torch import nn

import layerzip
from layerzip.cli import main
from layerzip.testing import ModelSourcePlugin


class Toy(layerzip.ModelSource):
    """A two-layer model whose 'compress' records what it was asked (a real source builds)."""

    name = "toy-built"
    description = "a model compressed while it is built"

    def __init__(self):
        self.model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.calls = []

    def default_spec(self):
        return {"rules": [{"targets": ["Linear"], "method": "toy_lowrank", "params": {"rank": 2}}]}

    def plan(self, spec):
        return layerzip.plan(self.model, spec)

    def compress(self, spec, out, *, progress=None):
        plan = self.plan(spec)
        self.calls.append((layerzip.Spec.parse(spec).to_dict(), out))
        report = layerzip.Report(model_params_before=1, model_params_after=1)
        return layerzip.CompressOutcome(
            report, [layerzip.Metric("held-out loss", 1.0, 1.25)], None,
            [f"{len(plan.layers)} layers planned"])


@pytest.fixture
def toy_source(register_plugin, toy):
    source = Toy()
    info = register_plugin(ModelSourcePlugin(source), "toy-sources")
    assert info.error is None, info.error
    return source


def test_plan_and_compress_go_through_the_source(toy_source, tmp_path, capsys):
    assert main(["plan", "--model", "toy-built", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [la["name"] for la in data["layers"]] == ["0", "2"]  # its default spec
    rj = tmp_path / "r.json"
    assert main(["compress", "--model", "toy-built", "--out", str(tmp_path / "o"),
                 "--report-json", str(rj)]) == 0
    text = capsys.readouterr().out
    assert "held-out loss" in text and "+0.25" in text and "2 layers planned" in text
    assert toy_source.calls[0][1] == str(tmp_path / "o")
    saved = json.loads(rj.read_text())
    assert saved["metrics"][0] == {"name": "held-out loss", "before": 1.0, "after": 1.25,
                                   "better": "lower"}


def test_source_errors_are_clear(toy_source, capsys):
    assert main(["compress", "--model", "toy-built", "--calib", "x.txt"]) == 1
    assert "--calib is for causal LMs" in capsys.readouterr().err
    assert main(["compress", "--model", "toy-built", "--window", "64", "--eval-windows", "2"]) == 1
    assert "--window, --eval-windows are for causal LMs" in capsys.readouterr().err
    assert main(["eval", "--model", "toy-built"]) == 1
    assert "works with 'layerzip plan' and 'layerzip compress' only" in capsys.readouterr().err
    assert main(["eval", "--model", "no-such-model"]) == 1
    assert "toy-built" in capsys.readouterr().err  # unknown names list the plugins' models


def test_a_source_may_not_shadow_a_built_in(register_plugin):
    class Shadow(Toy):
        name = "smollm2"

    info = register_plugin(ModelSourcePlugin(Shadow()), "shadow")
    assert info.error and "built-in model name" in info.error
    assert layerzip.get_registry().model_source("smollm2") is None


def test_plugins_command_lists_sources(toy_source, capsys):
    assert main(["plugins", "--json"]) == 0
    data = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert data["toy-sources"]["provides"]["model_sources"] == ["toy-built"]


def test_base_source_says_what_to_implement():
    with pytest.raises(NotImplementedError):
        layerzip.ModelSource().plan({})
    assert layerzip.ModelSource().default_spec() is None
