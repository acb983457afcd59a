"""The conformance kit for approximator plugins, and helpers to register a plugin in a test.

Every plugin — ours and third parties' — subclasses :class:`ApproximatorConformance` once per
method in its own tests::

    from layerzip.testing import ApproximatorConformance

    class TestSvd(ApproximatorConformance):
        method = "svd"
        budgets = [{"rank": 2}, {"rank": 8}, {"rank": 16}]
        full_budget = {"rank": 32}
        bad_params = [{"rank": -1}, {"rank": 2, "energy": 0.9}]

pytest then runs every check below against the method as installed.
"""

from __future__ import annotations

import copy
import tempfile
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from ..approximator import ApproxModule
from ..checkpoint import load, save
from ..errors import PluginError, SpecError
from ..hookspecs import hookimpl
from ..planning import plan
from ..plugins import get_registry
from ..walker import compress
from .ptx import compile_ptx

__all__ = ["ApproximatorConformance", "ModelSourcePlugin", "SingleLayer", "decaying_weight",
           "registered_plugin", "calibration_batches", "compile_ptx", "triton_test_device"]


def triton_test_device() -> str:
    """Where a plugin's Triton-kernel tests run: 'cuda' on a GPU, 'cpu' through Triton's
    interpreter (TRITON_INTERPRET=1, as scripts/test.sh sets); otherwise the calling test
    module is skipped with the reason. Call it at module level."""
    import pytest

    from ..backends import triton_interpreted

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if triton_interpreted():
        return "cpu"
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (scripts/test.sh sets it)",
                allow_module_level=True)


@contextmanager
def registered_plugin(plugin: object, name: str | None = None):
    """Register ``plugin`` (an object or module with ``@layerzip.hookimpl`` methods) for the
    duration of a ``with`` block. Raises PluginError if it fails to register."""
    reg = get_registry()
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    info = reg.add(plugin, name)
    if info.error:
        reg.remove(name)
        raise PluginError(f"plugin {name!r} failed to register: {info.error}")
    try:
        yield info
    finally:
        reg.remove(name)


class ModelSourcePlugin:
    """A plugin object registering the given :class:`layerzip.ModelSource` instances, for tests:
    ``register_plugin(ModelSourcePlugin(MySource()), "name")``."""

    def __init__(self, *sources):
        self.sources = sources

    @hookimpl
    def register_model_sources(self, register):
        for source in self.sources:
            register(source)


class SingleLayer(nn.Module):
    """A model holding one layer named ``layer`` (what the kit compresses)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def decaying_weight(out_features: int, in_features: int, *, decay: float = 0.8,
                    seed: int = 0) -> torch.Tensor:
    """A seeded W = U diag(σ) Vᵀ with σ_i = decay**i: a spectrum that budgets can exploit
    (random Gaussian matrices have flat spectra; this is for plumbing tests, not for claims)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_features, in_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.t()).float()


def calibration_batches(in_features: int, *, batches: int = 4, rows: int = 64,
                        seed: int = 1) -> list[torch.Tensor]:
    """Inputs with an anisotropic covariance, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, in_features)
    mix = torch.randn(in_features, in_features, generator=g) / in_features ** 0.5
    return [(torch.randn(rows, in_features, generator=g) * scale) @ (mix + torch.eye(in_features))
            for _ in range(batches)]


class ApproximatorConformance:
    """Checks every method must pass. Subclass it as ``TestSomething`` and set the attributes."""

    #: the method name as registered
    method: ClassVar[str] = ""
    #: params in increasing budget; the error must not grow along the list
    budgets: ClassVar[list[dict]] = []
    #: params of the method's maximal budget: the approximation must then be (nearly) exact
    full_budget: ClassVar[dict | None] = None
    full_budget_tolerance: ClassVar[float] = 1e-4
    #: params that must be rejected with a SpecError
    bad_params: ClassVar[list[dict]] = []
    #: the layer the kit compresses
    out_features: ClassVar[int] = 48
    in_features: ClassVar[int] = 32
    bias: ClassVar[bool] = True
    #: slack when checking that the error does not grow with the budget
    monotone_slack: ClassVar[float] = 1e-6
    #: set False for methods torch.compile cannot trace
    check_compile: ClassVar[bool] = True

    # -- helpers -----------------------------------------------------------------------------
    def make_layer(self, dtype=torch.float32) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias)
        with torch.no_grad():
            layer.weight.copy_(decaying_weight(self.out_features, self.in_features))
            if self.bias:
                layer.bias.copy_(torch.linspace(-1, 1, self.out_features))
        return layer.to(dtype)

    def spec(self, params: dict) -> dict:
        return {"rules": [{"targets": ["layer"], "method": self.method, "params": params}]}

    def compressed(self, params: dict, dtype=torch.float32):
        model = SingleLayer(self.make_layer(dtype))
        calib = [b.to(dtype) for b in calibration_batches(self.in_features)]
        report = compress(model, self.spec(params), calibration=calib, progress=False)
        return model, report

    def inputs(self, dtype=torch.float32) -> torch.Tensor:
        return calibration_batches(self.in_features, batches=1, rows=16, seed=99)[0].to(dtype)

    def first_budget(self) -> dict:
        return (self.budgets or [self.full_budget or {}])[0]

    # -- the checks --------------------------------------------------------------------------
    def test_registered(self):
        installed = list(get_registry().approximators)
        assert self.method in installed, \
            f"method {self.method!r} is not registered; installed: {installed}"

    @staticmethod
    def _dtypes():
        return (torch.float32, torch.float64)

    def test_keeps_shape_dtype_device_and_call_semantics(self):
        for dtype in self._dtypes():
            model, _ = self.compressed(self.first_budget(), dtype)
            m = model.layer
            assert isinstance(m, ApproxModule), f"layer became {type(m).__name__}"
            assert (m.in_features, m.out_features) == (self.in_features, self.out_features)
            x = self.inputs(dtype)
            for shape in [(self.in_features,), (5, self.in_features), (2, 3, self.in_features)]:
                xi = x.flatten()[: torch.Size(shape).numel()].reshape(shape) if len(shape) > 1 \
                    else x[0]
                y = m(xi)
                assert y.shape == (*shape[:-1], self.out_features)
                assert y.dtype == dtype and y.device == xi.device
            for t in m.state_dict().values():
                assert not t.is_floating_point() or t.dtype == dtype or \
                    t.dtype.itemsize < dtype.itemsize, \
                    f"stored tensor of {t.dtype} in a {dtype} layer"

    def test_full_budget_is_exact(self):
        if self.full_budget is None:
            return
        model, report = self.compressed(self.full_budget, torch.float64)
        err = report.rows[0].weight_error
        assert err is not None and err <= self.full_budget_tolerance, \
            f"at its maximal budget {self.full_budget} the weight error is {err}"
        x = self.inputs(torch.float64)
        ref = self.make_layer(torch.float64)(x)
        rel = (model(x) - ref).norm() / ref.norm()
        assert rel <= self.full_budget_tolerance * 10, f"output error {rel} at full budget"

    def test_error_does_not_grow_with_budget(self):
        errors = [self.compressed(p, torch.float64)[1].rows[0] for p in self.budgets]
        values = [r.weight_error if r.weight_error is not None else r.output_error
                  for r in errors]
        for (p0, e0), (p1, e1) in zip(zip(self.budgets, values), zip(self.budgets[1:],
                                                                      values[1:])):
            assert e1 <= e0 + self.monotone_slack, \
                f"error grew from {e0:.3g} ({p0}) to {e1:.3g} ({p1})"
        if len(values) >= 2:
            assert values[-1] < values[0], f"error did not fall across budgets: {values}"

    def test_save_load_round_trip_is_bit_exact(self):
        model, _ = self.compressed(self.first_budget())
        x = self.inputs()
        with torch.no_grad():
            before = model(x)
        with tempfile.TemporaryDirectory() as d:
            save(model, d)
            fresh = SingleLayer(self.make_layer())
            with torch.no_grad():
                fresh.layer.weight.mul_(0.5)  # the loaded tensors must win, not the base's
            load(fresh, d)
            with torch.no_grad():
                after = fresh(x)
        assert type(fresh.layer) is type(model.layer)
        assert torch.equal(before, after), "outputs after load differ from before save"

    def test_bad_params_are_rejected(self):
        for params in self.bad_params:
            model = SingleLayer(self.make_layer())
            original = copy.deepcopy(model.state_dict())
            try:
                plan(model, self.spec(params))
            except SpecError as exc:
                assert "rule 0" in str(exc), f"the error does not name the rule: {exc}"
            else:
                raise AssertionError(f"params {params} were accepted")
            assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())

    def test_backward(self):
        model, _ = self.compressed(self.first_budget())
        m = model.layer
        if not m.supports_backward:
            return
        x = self.inputs().requires_grad_(True)
        m(x).square().sum().backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad and p.numel()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert x.grad is not None and torch.isfinite(x.grad).all()

    def test_torch_compile(self):
        if not self.check_compile:
            return
        model, _ = self.compressed(self.first_budget())
        x = self.inputs()
        with torch.no_grad():
            eager = model(x)
            compiled = torch.compile(model.layer, fullgraph=False)(x)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
