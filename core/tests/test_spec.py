import json

import pytest
import torch
from torch import nn

import layerzip
from layerzip import Spec, SpecError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.head(self.encoder(x)))


def rule(**kw):
    base = {"targets": ["head"], "method": "toy_lowrank", "params": {"rank": 2}}
    base.update(kw)
    return base


# (spec, fragments the message must contain)
MALFORMED = [
    ({}, ["rules", "required"]),
    ({"rules": []}, ["rules", "at least 1"]),
    ({"rules": "head"}, ["rules", "valid list"]),
    ({"rules": [rule()], "stirct": False}, ["unknown field 'stirct'", "did you mean 'strict'"]),
    ({"rules": [{"method": "toy_lowrank", "params": {"rank": 2}}]},
     ["rules[0].targets", "required"]),
    ({"rules": [rule(targets=[])]}, ["rules[0].targets", "at least 1"]),
    ({"rules": [rule(targets=[""])]}, ["rules[0].targets", "non-empty"]),
    ({"rules": [rule(targets=["re:("])]}, ["rules[0].targets", "invalid regular expression"]),
    ({"rules": [rule(targets=["re:"])]}, ["rules[0].targets", "'re:' must be followed"]),
    ({"rules": [rule(targets=[" head"])]}, ["whitespace"]),
    ({"rules": [rule(ignore=["re:[a-"])]}, ["rules[0].ignore", "invalid regular expression"]),
    ({"rules": [rule(targets=[3])]}, ["rules[0].targets[0]", "valid string"]),
    ({"rules": [{"targets": ["head"], "params": {"rank": 2}}]}, ["rules[0].method", "required"]),
    ({"rules": [rule(method="toy_lowrnk")]},
     ["rule 0, field 'method'", "did you mean 'toy_lowrank'", "installed methods"]),
    ({"rules": [rule(method="nonexistent")]}, ["unknown method 'nonexistent'", "toy_lowrank"]),
    ({"rules": [rule(params={"rnak": 2})]}, ["rule 0, params", "'rnak'", "did you mean 'rank'"]),
    ({"rules": [rule(params={"rank": -1})]}, ["rule 0, params.rank", "greater than 0", "-1"]),
    ({"rules": [rule(params={"rank": "many"})]}, ["rule 0, params.rank", "'many'"]),
    ({"rules": [rule(params={})]}, ["rule 0, params.rank", "required"]),
    ({"rules": [rule(params=[2])]}, ["rules[0].params", "dictionary"]),
    ({"rules": [rule(backend="fsat")]}, ["rule 0, field 'backend'", "did you mean 'fast'"]),
    ({"rules": [rule(backend="fast")]}, ["rule 0, field 'backend'", "not available",
                                         "imaginary accelerator"]),
    ({"rules": [rule(), rule(targets=["nothing.here"])]}, ["rule 1", "matches no layer"]),
    ({"rules": [rule(targets=["norm"])]}, ["rule 0", "none is a layer type"]),
    ({"rules": [rule(targets=["Linear"]), rule(targets=["head"])]},
     ["rule 1", "taken by an earlier rule"]),
    ({"rules": [rule(targets=["head"], ignore=["Linear"])]}, ["rule 0", "ignored"]),
    ({"rules": [rule(params={"rank": 99})]}, ["rule 0, params", "layer 'head'", "rank 99 exceeds"]),
    ({"rules": [rule(extra=1)]}, ["rules[0]", "unknown field 'extra'"]),
    ({"rules": [rule()], "strict": "sometimes"}, ["strict", "valid boolean"]),
]


@pytest.mark.parametrize("spec,fragments", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_specs_raise_precise_spec_errors(toy, spec, fragments):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpecError) as info:
        layerzip.plan(model, spec)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert isinstance(info.value, ValueError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_at_least_twenty_distinct_malformed_specs():
    assert len({json.dumps(s, sort_keys=True) for s, _ in MALFORMED}) >= 20


def test_non_strict_spec_warns_instead(toy):
    spec = {"strict": False, "rules": [rule(), rule(targets=["nothing"])]}
    with pytest.warns(UserWarning, match="rule 1.*matches no layer"):
        p = layerzip.plan(Net(), spec)
    assert [la.name for la in p.layers] == ["head"]


def test_spec_from_yaml_and_json_files(toy, tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("rules:\n  - targets: head\n    method: toy_lowrank\n    params: {rank: 3}\n")
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"rules": [rule(params={"rank": 3})]}))
    for source in (y, str(y), j):
        spec = Spec.parse(source)
        assert spec.rules[0].targets == ["head"] and spec.rules[0].params == {"rank": 3}
    with pytest.raises(SpecError, match="does not exist"):
        Spec.parse(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        Spec.parse(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        Spec.parse(lst)


def test_first_matching_rule_wins_and_ignore_wins(toy):
    spec = {"rules": [
        {"targets": ["re:encoder\\.\\d+"], "ignore": ["encoder.2"], "method": "toy_lowrank",
         "params": {"rank": 1}},
        {"targets": ["Linear"], "method": "toy_lowrank", "params": {"rank": 4}},
    ]}
    p = layerzip.plan(Net(), spec)
    got = {la.name: (la.rule.index, la.rule.params.rank) for la in p.layers}
    assert got == {"encoder.0": (0, 1), "encoder.2": (1, 4), "head": (1, 4)}


def test_plan_estimates(toy):
    p = layerzip.plan(Net(), {"rules": [rule(params={"rank": 2})]})
    (layer,) = p.layers
    assert layer.before.params == 8 * 16 + 8
    assert layer.after.params == 2 * (8 + 16) + 8
    assert p.totals()["flops_per_token_after"] == 2 * 2 * 24


def test_json_schema_is_a_tagged_union_over_methods(toy):
    schema = layerzip.json_schema()
    text = json.dumps(schema)
    assert "toy_lowrank" in text and "rank" in text
    assert schema["title"] == "layerzip spec"
