"""Backend: one kernel for one factorized op, and how ``backend: auto`` picks among them."""

from __future__ import annotations

import importlib.util
import itertools
import os
from typing import ClassVar

import torch
from torch import Tensor


class Backend:
    """A kernel for ``op``. Subclass, set ``op``, ``name``, ``priority`` and implement
    ``__call__`` with the op's signature (the plugin defining the op documents it)."""

    op: ClassVar[str] = ""
    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    description: ClassVar[str] = ""
    #: True for the op's plain reference kernel: what modules fall back to for inputs their
    #: chosen backend declines, and what kernels are tested against.
    reference: ClassVar[bool] = False
    #: False for kernels autograd cannot see through (a raw Triton/CUDA launch, fp8 casts):
    #: :meth:`accepts` then declines calls that would need gradients.
    differentiable: ClassVar[bool] = True
    #: True for kernels whose results differ from the reference by more than rounding in the
    #: input dtype (fp8 GEMMs: percents): chosen by name only — a :class:`MeasuredBackend`
    #: never trades accuracy for speed on its own.
    lossy: ClassVar[bool] = False

    def available(self) -> tuple[bool, str]:
        """(True, "") when usable on this machine, else (False, why — e.g. what to install)."""
        return True, ""

    def supports(self, x: Tensor) -> bool:
        """Whether this kernel handles this input (device, dtype, shape). A module whose backend
        declines an input falls back to the op's reference backend."""
        return True

    def accepts(self, x: Tensor, *params: Tensor | None) -> bool:
        """What a module asks before calling the kernel: :meth:`supports` ``x``, and, when
        autograd is recording and ``x`` or any of ``params`` (the module's weights) needs a
        gradient, the kernel is :attr:`differentiable`. Otherwise the module uses the op's
        reference — so a non-differentiable kernel never silently drops a weight's gradient."""
        if not self.differentiable and torch.is_grad_enabled() and (
                x.requires_grad or any(p is not None and p.requires_grad for p in params)):
            return False
        return self.supports(x)

    def __call__(self, *args, **kwargs):
        raise NotImplementedError


def triton_interpreted() -> bool:
    """True when Triton kernels run through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonKernelBackend(Backend):
    """Base for backends whose kernel is written in Triton.

    Available with triton and a CUDA GPU, or on the CPU through ``TRITON_INTERPRET=1`` — there
    for tests only, so its priority drops below every real backend and ``auto`` never picks it.
    Inference only unless a subclass wraps its kernel in an autograd.Function and sets
    ``differentiable = True``: calls that need gradients are declined by :meth:`accepts` (the
    module falls back to the op's differentiable reference), and so are inputs seen while
    torch.compile traces unless the subclass sets ``compile_safe`` (its kernels are custom
    ops that a compiled graph can hold)."""

    differentiable: ClassVar[bool] = False
    #: True when the backend's call works while torch.compile traces (its kernels registered
    #: as torch.library custom ops); otherwise compiled modules run the op's reference
    compile_safe: ClassVar[bool] = False

    #: priority on a CUDA machine (set negative to make the kernel opt-in)
    gpu_priority: ClassVar[int] = 10

    @property
    def priority(self) -> int:  # type: ignore[override]
        return self.gpu_priority if torch.cuda.is_available() else -20

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        if not (torch.cuda.is_available() or triton_interpreted()):
            return False, "needs a CUDA GPU (or TRITON_INTERPRET=1 to run on the CPU, slowly)"
        return True, ""

    def supports(self, x: Tensor) -> bool:
        on_device = x.device.type == "cuda" or (triton_interpreted() and x.device.type == "cpu")
        return on_device and (self.compile_safe or not torch.compiler.is_compiling())


def _graph_seconds(fns) -> float | None:
    """Seconds per call of ``fns`` (calls run in turn) inside a CUDA graph, or None where that
    cannot be measured (no CUDA, or a call cannot be captured: then it is not chosen for
    graphs)."""
    if not torch.cuda.is_available():
        return None
    from .bench import graph_time

    try:
        return graph_time(fns, rounds=5, warmup=2, min_replay_s=5e-5, max_calls=32).median
    except RuntimeError:
        return None


def graph_capturing(x: Tensor | None = None) -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA): what a
    backend asks before work that synchronizes with the host (timing, building a packed or
    quantized form of the weights), which would break the capture. Given the call's input
    ``x``, it asks only when x is on a GPU, which skips the costlier check that CUDA is
    available (µs on every eager call of ``autotune``)."""
    if x is not None:
        return x.is_cuda and torch.cuda.is_current_stream_capturing()
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class MeasuredBackend(Backend):
    """Per input shape, time every other available backend of :attr:`op` once (CUDA events,
    fastest of ten calls, the calls taking copies of the operands in turn so that the weights
    come from device memory as in a model: :func:`layerzip.bench.distinct_copies`) and use the
    fastest from then on — the backend ``auto`` picks on a
    GPU when a plugin registers one. Subclasses set ``op`` and :meth:`shape_key`: what besides
    device, dtype and the bucketed token count decides a kernel's speed.

    Two choices per shape: the fastest eager call (for small layers that is the one with the
    least host time) and the fastest per call inside a CUDA graph (the GPU's time,
    :func:`layerzip.bench.graph_time`), which serves calls made while a graph is captured —
    a model step captured after an eager warm-up runs the kernel that is fastest there.
    Calls that need gradients are measured separately and choose among differentiable backends
    only, so this backend is itself differentiable; :attr:`Backend.lossy` backends are never
    candidates, so its results match the reference's accuracy. Choices are cached in
    :attr:`choices` and :attr:`graph_choices`, and what they were made from in :attr:`timings`
    (per key, each candidate's seconds per call: eager, and in a graph or None), so a
    benchmark can say why a shape got its kernel. While torch.compile traces, nothing can be timed:
    a call gets its shape's graph choice if that kernel can be traced (a custom op), else the
    reference — so call a model eagerly once per input shape before compiling it. Not available
    without a CUDA GPU: on a CPU there is one real kernel per op."""

    name: ClassVar[str] = "autotune"
    priority: ClassVar[int] = 30
    description: ClassVar[str] = "measure the available backends once per shape on the GPU " \
                                 "(eager and inside CUDA graphs), use the fastest"
    #: backends never measured (their first call compiles for minutes: torch.compile, TensorRT)
    skip: ClassVar[tuple[str, ...]] = ()

    def __init__(self):
        self.choices: dict[tuple, Backend] = {}
        self.graph_choices: dict[tuple, Backend] = {}
        self.timings: dict[tuple, dict[str, tuple[float, float | None]]] = {}

    def available(self) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "measures on a CUDA GPU only (none found)"
        return True, ""

    def supports(self, x: Tensor) -> bool:
        return x.device.type == "cuda"

    def shape_key(self, x: Tensor, *args) -> tuple:
        """What, with device, dtype and the token count's power-of-two bucket, keys a choice."""
        raise NotImplementedError

    def candidates(self, x: Tensor, grad: bool) -> list[Backend]:
        from .plugins import get_registry

        return [b for b in get_registry().backends_for(self.op)
                if b.name != self.name and b.name not in self.skip and not b.lossy
                and b.available()[0] and b.supports(x) and (b.differentiable or not grad)]

    @staticmethod
    def _token_bucket(tokens: int) -> int:
        return 1 << max(0, (tokens - 1).bit_length())

    def _key(self, x: Tensor, *args) -> tuple:
        grad = torch.is_grad_enabled() and (x.requires_grad or any(
            isinstance(a, Tensor) and a.requires_grad for a in args))
        t = x.numel() // max(x.shape[-1], 1)
        return (x.device, x.dtype, self._token_bucket(t), grad, *self.shape_key(x, *args))

    def measured_at(self, tokens: int) -> dict[tuple, dict]:
        """What was measured for calls of ``tokens`` rows, per (gradients or not, *shape_key):
        {"choice": eager choice, "graph_choice": its name, "seconds": {candidate: (eager,
        in a graph or None)}} — why each shape got its kernel."""
        bucket = self._token_bucket(tokens)
        return {key[3:]: {"choice": self.choices[key].name,
                          "graph_choice": self.graph_choices[key].name,
                          "seconds": dict(seconds)}
                for key, seconds in self.timings.items()
                if key[2] == bucket and key in self.graph_choices}

    def _compiled_choice(self, x: Tensor, *args) -> Backend | None:
        """While torch.compile traces nothing can be timed: the choice measured for CUDA graphs
        (a compiled step runs much as a captured one) if its kernel can be traced (a custom
        op), else None. Measured by an eager call of the same shape before compiling."""
        best = self.graph_choices.get(self._key(x, *args))
        return best if best is not None and best.accepts(x, *args) else None

    def accepts(self, x: Tensor, *params: Tensor | None) -> bool:
        if torch.compiler.is_compiling():
            # declined before a measurement: the module runs the op's reference, which a
            # compiled graph can hold (resolving it here would trace the plugin registry)
            return self._compiled_choice(x, *params) is not None
        return super().accepts(x, *params)

    def __call__(self, x: Tensor, *args):
        if torch.compiler.is_compiling():
            best = self._compiled_choice(x, *args)
            if best is None:  # a direct call, not through accepts
                from .plugins import get_registry

                best = get_registry().reference_backend(self.op)
            return best(x, *args)
        key = self._key(x, *args)
        grad = key[3]
        if graph_capturing(x):
            # timing synchronizes, which would break the capture: the choice measured for
            # graphs serves, or, before any measurement, the highest-priority candidate
            best = self.graph_choices.get(key) or self.candidates(x, grad)[0]
            return best(x, *args)
        best = self.choices.get(key)
        if best is None:
            from .bench import distinct_copies, time_callable

            timed, in_graph = [], []
            with torch.no_grad():
                # calls take copies of the operands in turn, so that the weights come from
                # device memory as in a model, not from the L2 cache the last call filled:
                # L2-resident, a decode-sized two-GEMM nearly matched the one-launch kernel
                # it loses to in a model (results/lowrank_llama.md, session 15)
                operands = distinct_copies(args, x.device)
                for b in self.candidates(x, grad):
                    calls = [lambda b=b, a=a: b(x, *a) for a in operands]
                    turn = itertools.cycle(calls)
                    # the fastest of ten rounds: host stalls only add time, and on the H100
                    # host a stall during the medians of five once made a 2x slower kernel
                    # the choice (results/history/lowrank_gpu_run4_session7.md)
                    timed.append((time_callable(lambda turn=turn: next(turn)(), rounds=10,
                                                warmup=3).min, b))
                    seconds = _graph_seconds(calls)
                    if seconds is not None:
                        in_graph.append((seconds, b))
                    self.timings.setdefault(key, {})[b.name] = (timed[-1][0], seconds)
            best = self.choices[key] = min(timed, key=lambda tb: tb[0])[1]
            self.graph_choices[key] = min(in_graph, key=lambda tb: tb[0])[1] if in_graph \
                else best
        return best(x, *args)
