"""Nyström sum layers for cirkit squared circuits (libcirkit; import ``cirkit``).

In a squared circuit every sum layer's weight is the symbolic ``KroneckerParameter(A, B)``
(A = B = W for c·c̄): M = A ⊗ B of shape (K_o², K_i²). cirkit evaluates it exactly in O(K³)
per fold (optimize=True) or by materializing M (optimize=False). ``NystromSumLayer`` keeps A
and B (the same trainable tensors the exact layer would use) and evaluates M ≈ C U R with
s pivot columns J and rows I chosen by a layerzip pivot strategy on a ``KroneckerWeightView``
(columns, rows and scores come from the factors: M is never formed): C = M[:, J] (K_o² × s),
U = pinv(M[I, J]), R = M[I, :] (s × K_i²), two semiring einsums, ≈ 2·s·K² per fold and input.

Layers are swapped in at compile time through a layer compilation rule for ``SumLayer``
(replacing modules of a compiled circuit does nothing: its address book keeps the old ones).
cirkit stores rules in a module-level dict shared by every PipelineContext, so
:func:`nystrom_sum_layers` is a context manager that restores the previous rule on exit.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

import layerzip

from .views import KroneckerWeightView, SymbolicKroneckerView

try:  # libcirkit is optional: only this module needs it
    from cirkit.backend.torch.layers import TorchLayer
    from cirkit.backend.torch.layers.inner import TorchInnerLayer
    from cirkit.backend.torch.parameters.parameter import TorchParameter
    from cirkit.symbolic.layers import SumLayer
    from cirkit.symbolic.parameters import KroneckerParameter, Parameter, ReferenceParameter
except ImportError:  # pragma: no cover - exercised only without libcirkit
    TorchInnerLayer = object  # type: ignore[assignment,misc]
    SumLayer = None


def _require_cirkit() -> None:
    if SumLayer is None:
        raise layerzip.PluginError("cirkit support needs libcirkit (pip install libcirkit; the "
                                   "PyPI package named 'cirkit' is an unrelated tool)")


class NystromSumLayer(TorchInnerLayer):
    """A folded sum layer with weight A ⊗ B evaluated through s Nyström pivots.

    Pivots are chosen per fold on the first forward (seeded by the spec's seed and the fold's
    weights; cirkit folds layers after
    compiling them one by one, so choosing them at compile time would keep layers with
    different pivots from folding) and kept in ``rows``/``cols`` (F, s);
    :meth:`reset_pivots` chooses again (e.g. after training A, B)."""

    def __init__(self, num_input_units: int, num_output_units: int, arity: int = 1, *,
                 a: TorchParameter, b: TorchParameter, rank: int, pivots: str = "leverage",
                 seed: int = 0, rcond: float = 1e-10, middle: str = "intersection",
                 semiring=None, num_folds: int = 1):
        super().__init__(num_input_units, num_output_units, arity, semiring=semiring,
                         num_folds=num_folds)
        if arity != 1:
            raise ValueError("NystromSumLayer handles arity-1 sum layers")
        (ko, ki), (ko2, ki2) = a.shape, b.shape
        if ko * ko2 != num_output_units or ki * ki2 != num_input_units:
            raise ValueError(f"A {a.shape} ⊗ B {b.shape} does not give "
                             f"{num_output_units}×{num_input_units}")
        if not 1 <= rank <= min(num_output_units, num_input_units):
            top = min(num_output_units, num_input_units)
            raise ValueError(f"rank {rank} must be in [1, {top}]")
        self.a, self.b = a, b
        if middle not in ("intersection", "optimal"):
            raise ValueError(f"middle must be 'intersection' or 'optimal', got {middle!r}")
        self.rank, self.pivots, self.seed, self.rcond = int(rank), pivots, int(seed), rcond
        self.middle = middle
        layerzip.get_pivot_strategy(pivots)  # unknown names fail here, with what is installed
        self.register_buffer("rows", torch.empty(0, dtype=torch.long))
        self.register_buffer("cols", torch.empty(0, dtype=torch.long))
        self._inference_cache: tuple | None = None

    @property
    def config(self) -> Mapping[str, Any]:
        return {"num_input_units": self.num_input_units,
                "num_output_units": self.num_output_units, "arity": self.arity,
                "rank": self.rank, "pivots": self.pivots, "seed": self.seed, "rcond": self.rcond,
                "middle": self.middle}

    @property
    def params(self) -> Mapping[str, TorchParameter]:
        return {"a": self.a, "b": self.b}

    def reset_pivots(self) -> None:
        self.rows = torch.empty(0, dtype=torch.long, device=self.rows.device)
        self.cols = torch.empty(0, dtype=torch.long, device=self.cols.device)

    @torch.no_grad()
    def _choose(self, a: Tensor, b: Tensor) -> None:
        strategy = layerzip.get_pivot_strategy(self.pivots)
        rows, cols = [], []
        for f in range(a.shape[0]):
            af, bf = a[f].real.double().cpu(), b[f].real.double().cpu()
            # Seeded by the fold's own weights, not its position: the circuit and its integral
            # (log Z) fold the same layer at different positions and must pick the same pivots.
            digest = zlib.crc32(af.numpy().tobytes() + bf.numpy().tobytes())
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + digest)
            view = KroneckerWeightView(af, bf)
            cols.append(strategy.select(view, self.rank, "cols", generator=g))
            rows.append(strategy.select(view, self.rank, "rows", generator=g))
        self.rows = torch.stack(rows).to(a.device)
        self.cols = torch.stack(cols).to(a.device)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(C (F, K_o², s), G = U R (F, s, K_i²)) from the current A and B."""
        a, b = self.a(), self.b()                                   # (F, ko, ki), (F, ko2, ki2)
        if self.rows.numel() == 0:
            self._choose(a.detach(), b.detach())
        f, ko, ki = a.shape
        _, ko2, ki2 = b.shape
        i1, i2 = self.rows // ko2, self.rows % ko2                  # (F, s)
        j1, j2 = self.cols // ki2, self.cols % ki2
        fa = torch.arange(f, device=a.device)[:, None]
        # C[:, t] = A[:, j1_t] ⊗ B[:, j2_t];  R[t, :] = A[i1_t, :] ⊗ B[i2_t, :]
        c = (a.transpose(1, 2)[fa, j1][:, :, :, None] * b.transpose(1, 2)[fa, j2][:, :, None, :]
             ).reshape(f, self.rank, ko * ko2).transpose(1, 2)
        r = (a[fa, i1][:, :, :, None] * b[fa, i2][:, :, None, :]).reshape(f, self.rank, ki * ki2)
        if self.middle == "optimal":
            # U = C⁺ M R⁺, the best middle for these pivots; M R⁺ by the vec trick:
            # (A ⊗ B) vec(Y) = vec(A Y Bᵀ), so M is still never formed (O(s·K³) per fold)
            r_pinv = torch.linalg.pinv(r.double(), rtol=self.rcond)              # (F, Ki², s)
            y = r_pinv.transpose(1, 2).reshape(f, self.rank, ki, ki2)
            m_rp = torch.einsum("foi,fsij,fpj->fsop", a.double(), y, b.double()).reshape(
                f, self.rank, ko * ko2).transpose(1, 2)                          # (F, Ko², s)
            u = (torch.linalg.pinv(c.double(), rtol=self.rcond) @ m_rp).to(r.dtype)
            return c, u @ r
        core = a[fa[:, :, None], i1[:, :, None], j1[:, None, :]] * \
            b[fa[:, :, None], i2[:, :, None], j2[:, None, :]]       # M[I, J]: (F, s, s)
        u = torch.linalg.pinv(core.double(), rtol=self.rcond).to(r.dtype)
        return c, u @ r

    def _cache_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.parameters()) + \
            (self.rows.data_ptr(), self.rows.numel())

    def _factors_for_forward(self) -> tuple[Tensor, Tensor]:
        """factors(), recomputed under autograd (A, B may be training) and cached otherwise
        until A, B or the pivots change, so inference does not redo the pseudo-inverses."""
        if torch.is_grad_enabled():
            self._inference_cache = None
            return self.factors()
        if self._inference_cache is None or self._inference_cache[0] != self._cache_key():
            factors = self.factors()  # may choose the pivots, so the key is taken after
            self._inference_cache = (self._cache_key(), factors)
        return self._inference_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        # x: (F, H=1, B, K_i²) → (F, B, K_i²)
        x = x.permute(0, 2, 1, 3).flatten(start_dim=2)
        c, g = self._factors_for_forward()
        h = self.semiring.einsum("fbi,fsi->fbs", inputs=(x,), operands=(g,), dim=-1,
                                 keepdim=True)
        return self.semiring.einsum("fbs,fos->fbo", inputs=(h,), operands=(c,), dim=-1,
                                    keepdim=True)

    def sample(self, x: Tensor):  # pragma: no cover - sampling needs positive weights
        raise NotImplementedError("sampling from a Nyström sum layer is not supported")


def _sub_parameter(param: Parameter, node) -> Parameter:
    """The symbolic sub-graph of ``param`` that computes ``node``."""
    seen, order = set(), []

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for i in param.node_inputs(n):
            visit(i)
        order.append(n)

    visit(node)
    return Parameter(order, {n: param.node_inputs(n) for n in order}, [node])


@contextmanager
def _sum_layer_rule(choose):
    """Inside the block cirkit compiles an arity-1 ``SumLayer`` with a Kronecker weight into a
    :class:`NystromSumLayer` with the keyword arguments ``choose(sl)`` returns (None: compile it
    as usual). Restores cirkit's shared rule dict on exit, even on error."""
    _require_cirkit()
    from cirkit.backend.torch import compiler as torch_compiler

    rules = torch_compiler.DEFAULT_LAYER_COMPILATION_RULES
    saved = dict(rules)
    default_rule = rules[SumLayer]
    counts = {"replaced": 0, "kept": 0}

    def compile_sum_layer(compiler, sl):
        kwargs = choose(sl) if is_kronecker_sum_layer(sl) else None
        if kwargs is None:
            counts["kept"] += 1
            return default_rule(compiler, sl)
        weight = sl.weight
        a_node, b_node = weight.node_inputs(weight.output)
        a = compiler.compile_parameter(_sub_parameter(weight, a_node))
        b = compiler.compile_parameter(_sub_parameter(weight, b_node))
        counts["replaced"] += 1
        return NystromSumLayer(sl.num_input_units, sl.num_output_units, sl.arity, a=a, b=b,
                               semiring=compiler.semiring, **kwargs)

    # cirkit picks the rule by the annotation of its last argument
    compile_sum_layer.__annotations__ = {"compiler": object, "sl": SumLayer,
                                         "return": TorchLayer}
    rules[SumLayer] = compile_sum_layer
    try:
        yield counts
    finally:
        rules.clear()
        rules.update(saved)


def is_kronecker_sum_layer(layer) -> bool:
    """An arity-1 symbolic ``SumLayer`` whose weight is a Kronecker product (squared circuits)."""
    return SumLayer is not None and isinstance(layer, SumLayer) and layer.arity == 1 and \
        isinstance(layer.weight.output, KroneckerParameter)


@contextmanager
def nystrom_sum_layers(rank: int | float, pivots: str = "leverage", *, seed: int = 0,
                       rcond: float = 1e-10, middle: str = "intersection", select=None):
    """Inside the block, cirkit compiles every arity-1 ``SumLayer`` whose weight is a
    Kronecker product (the sum layers of squared circuits) into a :class:`NystromSumLayer`;
    other sum layers compile as usual. ``rank`` is s, or a fraction of min(K_o², K_i²) when a
    float (either is capped at that full rank); ``middle`` is 'intersection' (U = pinv(M[I, J]),
    the classic Nyström middle) or 'optimal' (U = C⁺ M R⁺, never worse for the same pivots,
    O(s·K³) per fold); ``select(sl) -> bool`` restricts which layers. The previous rule is
    restored on exit, even on error. Yields a dict counting replaced / kept layers."""

    def choose(sl):
        if select is not None and not select(sl):
            return None
        full = min(sl.num_output_units, sl.num_input_units)
        s = rank if isinstance(rank, int) else max(1, math.ceil(rank * full))
        return {"rank": min(s, full), "pivots": pivots, "seed": seed, "rcond": rcond,
                "middle": middle}

    with _sum_layer_rule(choose) as counts:
        yield counts


class CirkitSumLayerAdapter(layerzip.LayerAdapter):
    """The Kronecker sum layers of a symbolic squared circuit. They are replaced while the circuit
    is compiled (a compiled circuit's address book keeps its layers), so this adapter serves
    planning: it recognizes the layers and gives their shape; :func:`compile_circuit` does the
    swap."""

    name = "cirkit-sum"

    def accepts(self, module) -> bool:
        return is_kronecker_sum_layer(module)

    def view(self, module) -> SymbolicKroneckerView:
        weight = module.weight
        a, b = weight.node_inputs(weight.output)
        return SymbolicKroneckerView(tuple(a.shape), tuple(b.shape))

    def replace(self, model, name, new):
        raise layerzip.LayerzipError(
            f"cirkit sum layer {name!r} cannot be swapped after compilation; compile the symbolic "
            "circuit with layerzip_nystrom.compile_circuit(circuit, spec) instead")


class SymbolicCircuitLayers:
    """A symbolic circuit's layers under names the spec can target: ``sum.<i>``, ``product.<i>``
    and ``input.<i>``, numbered per kind in cirkit's topological order (the root sum layer comes
    last). Has the ``named_modules()`` that :func:`layerzip.plan` walks."""

    def __init__(self, circuit):
        self.circuit = circuit
        self._layers = []
        counts: dict[str, int] = {}
        for layer in circuit.topological_ordering():
            kind = _kind(layer)
            name = f"{kind}.{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
            self._layers.append((name, layer))

    def named_modules(self):
        yield "", self.circuit
        yield from self._layers


def _kind(layer) -> str:
    from cirkit.symbolic.layers import InputLayer

    if isinstance(layer, SumLayer):
        return "sum"
    return "input" if isinstance(layer, InputLayer) else "product"


def plan_circuit(circuit, spec) -> layerzip.Plan:
    """Which sum layers of the symbolic ``circuit`` get which Nyström params, by the same spec
    rules as any model (targets by class ``SumLayer`` or by name ``sum.<i>``, ``ignore``, first
    match wins, strict no-match errors). Sizes are those of the squared layer M = A ⊗ B
    (K_o² × K_i²): 'params' is M materialized, 'params after' the Nyström factors C and U·R."""
    _require_cirkit()
    spec = layerzip.Spec.parse(spec)
    plan = layerzip.plan(SymbolicCircuitLayers(circuit), spec)
    for layer in plan.layers:
        p = layer.rule.params
        if layer.method != "nystrom":
            raise layerzip.SpecError(f"{layer.rule.label}, field 'method': cirkit sum layers "
                                     f"(e.g. {layer.name!r}) support 'nystrom', got "
                                     f"{layer.method!r}")
        if p.selection != "sample" or p.replace:
            raise layerzip.SpecError(f"{layer.rule.label}, params: circuits sample pivots without "
                                     "replacement (selection: sample, replace: false)")
    return plan


def _factor_key(layer) -> tuple[int, int]:
    weight = layer.weight
    return tuple(id(n.deref()) if isinstance(n, ReferenceParameter) else id(n)
                 for n in weight.node_inputs(weight.output))


def compile_circuit(circuit, spec, *, semiring: str = "complex-lse-sum", fold: bool = True,
                    optimize: bool = True, others=(), plan: layerzip.Plan | None = None):
    """Compile a symbolic cirkit circuit with its Kronecker sum layers approximated as a layerzip
    spec says (see :func:`plan_circuit`), e.g. ``{"rules": [{"targets": ["SumLayer"], "ignore":
    ["sum.1048"], "method": "nystrom", "params": {"rank": 16, "pivots": "leverage"}}]}``.
    ``others`` are more symbolic circuits compiled in the same pipeline (sharing parameters),
    such as the integral giving log Z; ``plan`` reuses :func:`plan_circuit`'s result for this
    circuit and spec. Returns ([compiled circuit, *compiled others],
    {"replaced", "kept"} counts, the plan)."""
    _require_cirkit()
    from cirkit.pipeline import PipelineContext

    spec = layerzip.Spec.parse(spec)
    plan = plan or plan_circuit(circuit, spec)
    # The integral of a circuit (log Z) is a new symbolic circuit whose layers are copies that
    # reference the same parameter tensors: match layers by the tensors their factors point to.
    chosen = {_factor_key(layer.module): layer.rule.params for layer in plan.layers}

    def choose(sl):
        p = chosen.get(_factor_key(sl))
        if p is None:
            return None
        return {"rank": p.rank, "pivots": p.pivots, "seed": spec.seed, "rcond": p.rcond,
                "middle": p.middle}

    with _sum_layer_rule(choose) as counts:
        ctx = PipelineContext(backend="torch", semiring=semiring, fold=fold, optimize=optimize)
        compiled = [ctx.compile(c) for c in (circuit, *others)]
    return compiled, dict(counts), plan


__all__ = ["CirkitSumLayerAdapter", "NystromSumLayer", "SymbolicCircuitLayers", "compile_circuit",
           "is_kronecker_sum_layer", "nystrom_sum_layers", "plan_circuit"]
