"""MeasuredBackend: times the op's other backends once per shape key and keeps the fastest;
calls that need gradients choose among differentiable backends only; lossy backends and those
named in ``skip`` are never measured (they raise if called). Run on the CPU through a
subclass that accepts CPU inputs (the real ones measure on a GPU only)."""

import time
import types

import layerzip
import pytest
import torch
from layerzip import Backend, MeasuredBackend

OP = "measured_toy"


class Slow(Backend):
    op, name, priority, reference = OP, "slow", 0, True
    calls = 0

    def __call__(self, x, w):
        Slow.calls += 1
        time.sleep(0.002)
        return x @ w


class FastNoGrad(Backend):
    op, name, priority, differentiable = OP, "fast", 5, False
    calls = 0

    def __call__(self, x, w):
        FastNoGrad.calls += 1
        return (x @ w).detach()


class Skipped(Backend):
    op, name, priority = OP, "never", 1

    def __call__(self, x, w):
        raise AssertionError("a backend named in skip must not be measured")


class FastLossy(Backend):
    op, name, priority, lossy = OP, "lossy", 3, True

    def __call__(self, x, w):
        raise AssertionError("a lossy backend must not be measured: autotune keeps accuracy")


class CpuMeasured(MeasuredBackend):
    op = OP
    skip = ("never",)

    def supports(self, x):
        return True

    def shape_key(self, x, w):
        return (tuple(w.shape),)


@pytest.fixture
def measured(register_plugin):
    plugin = types.SimpleNamespace(register_backends=layerzip.hookimpl(
        lambda register: [register(b) for b in (Slow(), FastNoGrad(), Skipped(), FastLossy())]))
    register_plugin(plugin, "measured-toy")
    Slow.calls = FastNoGrad.calls = 0
    return CpuMeasured()


def test_picks_the_fastest_once_per_shape(measured):
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    torch.testing.assert_close(measured(x, w), x @ w)
    assert measured.choices and all(b.name == "fast" for b in measured.choices.values())
    timed = Slow.calls
    assert timed > 0, "the slow candidate was measured too"
    measured(x, w)
    assert Slow.calls == timed, "the choice is cached: no second measurement"
    measured(x, torch.randn(8, 5))  # a new shape key: measured again
    assert len(measured.choices) == 2 and Slow.calls > timed


def test_calls_needing_gradients_choose_a_differentiable_backend(measured):
    x, w = torch.randn(4, 8), torch.randn(8, 3, requires_grad=True)
    y = measured(x, w)
    assert y.requires_grad, "the non-differentiable kernel would have dropped the gradient"
    y.sum().backward()
    assert w.grad is not None
    (choice,) = measured.choices.values()
    assert choice.name == "slow"
    assert measured.accepts(x, w), "MeasuredBackend itself never drops a gradient"


def test_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ok, why = CpuMeasured().available()
    assert not ok and "CUDA GPU" in why


def test_graph_capturing_is_false_outside_a_capture():
    """With an input, only a GPU input can be captured; without one, it asks CUDA."""
    assert layerzip.graph_capturing(torch.zeros(2)) is False
    assert layerzip.graph_capturing() is False
    if torch.cuda.is_available():
        x = torch.zeros(2, device="cuda")
        assert layerzip.graph_capturing(x) is False
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            seen = layerzip.graph_capturing(x), layerzip.graph_capturing()
            x.add_(1)
        assert seen == (True, True)


def test_a_first_call_inside_a_cuda_graph_capture_does_not_measure(measured, monkeypatch):
    """Timing synchronizes, which a capture forbids: the top candidate serves, nothing cached."""
    import layerzip.backends

    monkeypatch.setattr(layerzip.backends, "graph_capturing", lambda x=None: True)
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    torch.testing.assert_close(measured(x, w), x @ w)
    assert measured.choices == {} and FastNoGrad.calls == 1 and Slow.calls == 0


def test_calls_inside_a_capture_use_the_choice_measured_for_graphs(measured, monkeypatch):
    """Eager, the host's time decides; inside a CUDA graph, the GPU's. Here the slow-eager
    candidate is the faster one in a graph (as a one-launch kernel is against torch's several
    launches): after the measuring call, a capture gets it while eager calls keep the other."""
    import layerzip.backends

    monkeypatch.setattr(layerzip.backends, "_graph_seconds",
                        lambda fns: 1e-6 if _is_slow(fns) else 1e-3)
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    measured(x, w)
    (eager,), (graphed,) = measured.choices.values(), measured.graph_choices.values()
    assert eager.name == "fast" and graphed.name == "slow"
    # what the choices were made from, per candidate: (eager seconds, seconds in a graph)
    (shape, seen), = measured.measured_at(4).items()
    assert shape[0] is False  # no gradients
    assert seen["choice"] == "fast" and seen["graph_choice"] == "slow"
    assert seen["seconds"]["slow"][1] == 1e-6 and seen["seconds"]["fast"][1] == 1e-3
    assert seen["seconds"]["fast"][0] < seen["seconds"]["slow"][0]
    assert measured.measured_at(64) == {}, "another token bucket: nothing measured"
    monkeypatch.setattr(layerzip.backends, "graph_capturing", lambda x=None: True)
    before = Slow.calls
    torch.testing.assert_close(measured(x, w), x @ w)
    assert Slow.calls == before + 1


def test_without_graph_timings_graphs_get_the_eager_choice(measured, monkeypatch):
    import layerzip.backends

    monkeypatch.setattr(layerzip.backends, "_graph_seconds", lambda fns: None)  # no CUDA
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    measured(x, w)
    assert [b.name for b in measured.graph_choices.values()] == ["fast"]


def _is_slow(fns) -> bool:
    """Whether ``fns`` (the measuring closures over one candidate) call the Slow backend."""
    before = Slow.calls
    fns[0]()
    return Slow.calls > before


def test_candidates_are_timed_over_distinct_copies_of_the_operands(measured, monkeypatch):
    """In a model a layer's weights come from device memory, not from the L2 cache its last
    call filled: each candidate's calls take copies of the operands in turn (on a GPU,
    enough to exceed L2; here three, by a stand-in for distinct_copies), eagerly and in a
    graph; the layer's own operands are among them and are not modified."""
    import layerzip.backends
    import layerzip.bench

    x, w = torch.randn(4, 8), torch.randn(8, 3)
    copies = [(w,), (w.clone(),), (w.clone(),)]
    monkeypatch.setattr(layerzip.bench, "distinct_copies", lambda args, device: copies)
    seen, graph_calls = [], []
    original = FastNoGrad.__call__
    monkeypatch.setattr(FastNoGrad, "__call__",
                        lambda self, x, w: seen.append(w) or original(self, x, w))

    def graph_seconds(fns):
        graph_calls.append(len(fns))
        return 1e-3
    monkeypatch.setattr(layerzip.backends, "_graph_seconds", graph_seconds)
    measured(x, w)
    assert {id(t) for t in seen} == {id(c[0]) for c in copies}, "every copy was timed"
    assert graph_calls == [3, 3], "each candidate's graph holds one call per copy"



def test_while_compiling_only_a_measured_graph_choice_is_taken(measured, monkeypatch):
    """torch.compile's tracing cannot time anything: before a shape is measured eagerly the
    backend declines it (the module runs the op's reference); after, the choice measured for
    graphs serves, without measuring again."""
    import layerzip.backends

    monkeypatch.setattr(layerzip.backends, "_graph_seconds",
                        lambda fns: 1e-6 if _is_slow(fns) else 1e-3)
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with monkeypatch.context() as tracing:
        tracing.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not measured.accepts(x, w)
    measured(x, w)  # eager: measures
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert measured.accepts(x, w)
    before = Slow.calls
    torch.testing.assert_close(measured(x, w), x @ w)
    assert Slow.calls == before + 1, "the graph choice ran, once, unmeasured"
    assert not measured.accepts(x, torch.randn(8, 5)), "another shape: not measured yet"
