"""compress(): plan, calibrate, fit, swap — all or nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .approximator import ApproxModule, FitContext, LayerStats
from .calibration import collect_stats
from .errors import CompressionError, SpecError
from .planning import Plan, PlannedLayer, plan
from .plugins import Registry, get_registry
from .report import LayerRow, Report

#: compress records what it did on the model under this attribute; save() writes it out.
STATE_ATTR = "_layerzip_state"
#: Weight errors need Ŵ densely; skip them above this many entries.
MAX_DENSE_CHECK = 1 << 24


def compress(model: nn.Module, spec, calibration: Iterable | None = None, *,
             holdout: Iterable | None = None, progress: bool | None = None,
             registry: Registry | None = None) -> Report:
    """Replace the layers ``spec`` selects, in place, and return a :class:`Report`.

    ``calibration`` and ``holdout`` are iterables of batches fed as ``model(**b)`` (mapping),
    ``model(*b)`` (tuple) or ``model(b)``. Methods that need input statistics get them from
    ``calibration``; output errors in the report are measured on ``holdout`` when given, else
    on the calibration inputs. If fitting or swapping any layer fails, every layer is put back
    and :class:`CompressionError` names the layer and the cause.
    """
    registry = registry or get_registry()
    the_plan = plan(model, spec, registry)
    if the_plan.needs_calibration and calibration is None:
        layer = next(la for la in the_plan.layers
                     if la.rule.approximator.needs_calibration(la.rule.params))
        raise SpecError(f"{layer.rule.label} needs calibration data (its params ask for input "
                        f"statistics, e.g. layer {layer.name!r}): pass calibration=<iterable of "
                        "batches> to compress(), or --calib FILE to the CLI")
    stats: dict[str, LayerStats] = {}
    if calibration is not None and the_plan.layers:
        stats = collect_stats(model, the_plan.layers, calibration, holdout, seed=the_plan.spec.seed)
    params_before = count_params(model)
    report = Report(model_params_before=params_before,
                    output_error_on=None if not stats else ("holdout" if holdout else
                                                            "calibration"))
    fitted: list[tuple[PlannedLayer, ApproxModule]] = []
    current = None
    with _progress(progress, len(the_plan.layers)) as advance:
        try:
            for layer in the_plan.layers:
                current = layer
                t0 = time.perf_counter()
                module = _fit_one(layer, stats.get(layer.name), the_plan.spec.seed)
                seconds = time.perf_counter() - t0
                report.rows.append(_measure(layer, module, stats.get(layer.name), seconds))
                fitted.append((layer, module))
                advance(layer.name)
        except Exception as exc:
            raise CompressionError(
                f"layer {current.name!r} ({current.layer_type}, {current.rule.label}) failed: "
                f"{type(exc).__name__}: {exc}. No layer was replaced; the model is unchanged."
            ) from exc
    _swap_all(model, fitted)
    _record(model, the_plan, fitted)
    report.model_params_after = count_params(model)
    return report


def _fit_one(layer: PlannedLayer, stats: LayerStats | None, seed: int) -> ApproxModule:
    r = layer.rule
    ctx = FitContext(name=layer.name, backend=r.backend, stats=stats, seed=seed)
    module = r.approximator.fit(layer.view, r.params, ctx)
    if not isinstance(module, ApproxModule):
        raise TypeError(f"method {r.approximator.name!r} returned {type(module).__name__}, "
                        "not a layerzip.ApproxModule")
    if (module.in_features, module.out_features) != (layer.view.in_features,
                                                     layer.view.out_features):
        raise ValueError(f"method {r.approximator.name!r} built a module of shape "
                         f"{module.out_features}×{module.in_features}, expected "
                         f"{layer.view.out_features}×{layer.view.in_features}")
    module.to(device=layer.view.device, dtype=layer.view.dtype)
    module.train(layer.module.training)
    module.layerzip_method = r.approximator.name
    return module


@torch.no_grad()
def _measure(layer: PlannedLayer, module: ApproxModule, stats: LayerStats | None,
             seconds: float) -> LayerRow:
    view = layer.view
    w = None
    weight_error = None
    if view.out_features * view.in_features <= MAX_DENSE_CHECK:
        w = view.dense(torch.float64)
        w_hat = module.dense_weight()
        if w_hat is not None:
            weight_error = float(torch.linalg.matrix_norm(w - w_hat.to(w.device, torch.float64))
                                 / torch.linalg.matrix_norm(w).clamp_min(1e-300))
    output_error = None
    x = None if stats is None else (stats.holdout if stats.holdout is not None else stats.samples)
    if x is not None and x.shape[0] > 0:
        w = view.dense(torch.float64) if w is None else w
        xd = x.to(w.device, torch.float64)  # samples are kept on the CPU; the layer may not be
        y_ref = xd @ w.t()
        if view.bias is not None:
            y_ref = y_ref + view.bias.to(w.device, torch.float64)
        y = module(x.to(device=view.device, dtype=view.dtype)).to(w.device, torch.float64)
        output_error = float(torch.linalg.matrix_norm(y - y_ref)
                             / torch.linalg.matrix_norm(y_ref).clamp_min(1e-300))
    elem_size = torch.empty(0, dtype=view.dtype).element_size()
    return LayerRow(
        name=layer.name, layer_type=layer.layer_type, method=layer.method,
        backend=getattr(module, "backend_name", layer.rule.backend),
        params_before=layer.before.params, params_after=stored_elements(module),
        bytes_before=layer.before.params * elem_size, bytes_after=stored_bytes(module),
        flops_before=layer.before.flops_per_token, flops_after=layer.after.flops_per_token,
        weight_error=weight_error, output_error=output_error, fit_seconds=round(seconds, 4),
        details=dict(getattr(module, "fit_details", {}) or {}),
    )


def _swap_all(model: nn.Module, fitted) -> None:
    undo = []
    try:
        for layer, module in fitted:
            undo.append(layer.adapter.replace(model, layer.name, module))
    except Exception as exc:
        for u in reversed(undo):
            u()
        raise CompressionError(f"swapping in layer {layer.name!r} failed: {exc}. Every layer was "
                               "put back; the model is unchanged.") from exc


def _record(model: nn.Module, the_plan: Plan, fitted) -> None:
    model.__dict__.setdefault(STATE_ATTR, {"specs": [], "layers": {}})["specs"].append(
        the_plan.spec.to_dict())
    for layer, _ in fitted:
        _record_layer(model, layer.name, layer.adapter.name, layer.layer_type)


def _record_layer(model: nn.Module, name: str, adapter: str | None, layer_type: str | None):
    state = model.__dict__.setdefault(STATE_ATTR, {"specs": [], "layers": {}})
    state["layers"][name] = {"adapter": adapter, "layer_type": layer_type}


def count_params(model: nn.Module) -> int:
    """Distinct stored elements of parameters and buffers (tied tensors count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel()) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def stored_elements(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class _progress:
    """A rich progress bar over layers, shown only on a terminal and when not disabled."""

    def __init__(self, enabled: bool | None, total: int):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = total

    def __enter__(self):
        if not self.enabled:
            return lambda name: None
        self.p = Progress(TextColumn("[bold]compress"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("{task.description}"), transient=True)
        self.p.__enter__()
        task = self.p.add_task("", total=self.total)
        return lambda name: self.p.update(task, advance=1, description=name)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False
