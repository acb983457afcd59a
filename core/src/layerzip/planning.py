"""plan(): which layer gets which method, backend and estimated cost — no computation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from rich.table import Table
from torch import nn

from .adapters import LayerAdapter
from .approximator import Estimate
from .errors import SpecError
from .matching import Pattern, matches_any
from .plugins import Registry, get_registry
from .spec import ResolvedRule, Spec, resolve
from .views import WeightView


@dataclass
class PlannedLayer:
    name: str
    module: nn.Module
    adapter: LayerAdapter
    rule: ResolvedRule
    view: WeightView
    before: Estimate
    after: Estimate

    @property
    def layer_type(self) -> str:
        return type(self.module).__name__

    @property
    def method(self) -> str:
        return self.rule.approximator.name


@dataclass
class Plan:
    spec: Spec
    rules: list[ResolvedRule]
    layers: list[PlannedLayer]
    warnings: list[str] = field(default_factory=list)

    @property
    def needs_calibration(self) -> bool:
        return any(layer.rule.approximator.needs_calibration(layer.rule.params)
                   for layer in self.layers)

    def totals(self) -> dict:
        b = sum(layer.before.params for layer in self.layers)
        a = sum(layer.after.params for layer in self.layers)
        fb = sum(layer.before.flops_per_token for layer in self.layers)
        fa = sum(layer.after.flops_per_token for layer in self.layers)
        return {"layers": len(self.layers), "params_before": b, "params_after": a,
                "flops_per_token_before": fb, "flops_per_token_after": fa}

    def to_table(self) -> Table:
        t = Table(title="layerzip plan", show_lines=False)
        for col in ("layer", "type", "method", "backend", "shape (out×in)", "params",
                    "params after", "FLOPs/token after"):
            t.add_column(col, justify="right" if "params" in col or "FLOP" in col else "left")
        for layer in self.layers:
            t.add_row(layer.name, layer.layer_type, layer.method, layer.rule.backend,
                      f"{layer.view.out_features}×{layer.view.in_features}",
                      f"{layer.before.params:,}", f"{layer.after.params:,}",
                      f"{layer.after.flops_per_token:,}")
        tot = self.totals()
        ratio = tot["params_after"] / max(tot["params_before"], 1)
        t.add_section()
        t.add_row(f"{tot['layers']} layers", "", "", "", "", f"{tot['params_before']:,}",
                  f"{tot['params_after']:,} ({ratio:.1%})", f"{tot['flops_per_token_after']:,}")
        return t


def plan(model: nn.Module, spec, registry: Registry | None = None) -> Plan:
    """Match every module of ``model`` against ``spec`` (a Spec, dict, or YAML/JSON path/text).
    ``model`` is an nn.Module, or anything with an nn.Module-like ``named_modules()`` whose
    layers some adapter accepts (a plugin's symbolic graph, e.g. a cirkit circuit's layers).

    Only modules some adapter accepts are candidates; the first rule whose targets match (and
    whose ignore does not) wins. A rule that matches no candidate is a SpecError when the spec
    is strict, otherwise a warning. Params are checked against each layer's shape here.
    """
    registry = registry or get_registry()
    spec = Spec.parse(spec)
    rules = resolve(spec, registry)
    candidates = [(name, module, adapter) for name, module in model.named_modules()
                  if (adapter := registry.adapter_for(module)) is not None and name]
    hits = [0] * len(rules)
    layers = []
    for name, module, adapter in candidates:
        for r in rules:
            if matches_any(r.rule.targets, name, module) and not \
                    matches_any(r.rule.ignore, name, module):
                hits[r.index] += 1
                layers.append(_planned(name, module, adapter, r))
                break
    problems = []
    for r, n in zip(rules, hits, strict=True):
        if n == 0:
            problems.append(_no_match_message(model, r, candidates))
    if problems and spec.strict:
        raise SpecError("; ".join(problems) + " (set 'strict: false' in the spec to only warn)")
    for p in problems:
        warnings.warn(p, stacklevel=2)
    return Plan(spec, rules, layers, problems)


def _planned(name: str, module: nn.Module, adapter: LayerAdapter, r: ResolvedRule) -> PlannedLayer:
    view = adapter.view(module)
    try:
        r.approximator.check(view, r.params)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"rule {r.index}, params: layer {name!r} ({view.out_features}×"
                        f"{view.in_features}): {exc}") from None
    before = Estimate.dense(view.out_features, view.in_features, view.bias is not None)
    return PlannedLayer(name, module, adapter, r, view, before,
                        r.approximator.estimate(view, r.params))


def _no_match_message(model: nn.Module, r: ResolvedRule, candidates) -> str:
    targets = r.rule.targets
    other = [n for n, m in model.named_modules() if n and matches_any(targets, n, m)]
    claimed = [n for n, m, _ in candidates if matches_any(targets, n, m)]
    if claimed:
        why = (f"its targets match {len(claimed)} layer(s) (e.g. {claimed[0]!r}), but each is "
               "ignored or taken by an earlier rule")
    elif other:
        why = (f"its targets match {len(other)} module(s) (e.g. {other[0]!r}) but none is a layer "
               "type an installed adapter accepts (see 'layerzip plugins')")
    else:
        example = candidates[0][0] if candidates else None
        kinds = ", ".join(sorted({Pattern(t).kind for t in targets}))
        why = (f"no module name or class matches its targets ({kinds} patterns)"
               + (f"; layer names look like {example!r}" if example else "; the model has no "
                  "replaceable layers"))
    return f"rule {r.index} (targets {targets}) matches no layer: {why}"
