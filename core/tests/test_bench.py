"""layerzip.bench: CPU timing, the L2-copies rule, and the CUDA-graph per-call timer (which
on the GPU must count its calls: a per-call figure divided by the wrong count is a false
speedup)."""

import pytest
import torch

from layerzip import bench

ON_GPU = torch.cuda.is_available()


def test_time_callable_on_cpu_times_every_round():
    calls = []
    timing = bench.time_callable(lambda: calls.append(1), rounds=7, warmup=2, device="cpu")
    assert len(calls) == 9
    assert timing.rounds == 7 and len(timing.times) == 7 and timing.calls_per_round == 1
    assert timing.min <= timing.median <= timing.max and timing.device == "cpu"


def test_time_callable_refuses_zero_rounds():
    with pytest.raises(ValueError, match="rounds"):
        bench.time_callable(lambda: None, rounds=0, device="cpu")


def test_distinct_copies_clone_the_tensors_only_on_a_gpu(monkeypatch):
    w, b = torch.randn(64, 64), torch.randn(64)
    assert bench.distinct_copies((w, None, b), "cpu") == [(w, None, b)], \
        "a CPU has no L2 to step around: the operands alone"
    monkeypatch.setattr(bench, "copies_beyond_l2", lambda nbytes, dev, at_least: 3)
    copies = bench.distinct_copies((w, None, b), "cuda")
    assert len(copies) == 3 and copies[0][0] is w
    for cw, none, cb in copies[1:]:
        assert none is None and cw is not w and cb is not b
        assert torch.equal(cw, w) and torch.equal(cb, b)
    monkeypatch.setattr(bench, "copies_beyond_l2", lambda nbytes, dev, at_least: 10_000)
    assert len(bench.distinct_copies((w,), "cuda", at_most=5)) == 5, "tiny operands: capped"
    assert bench.distinct_copies((None, 3), "cuda") == [(None, 3)], "no tensors: nothing to copy"


def test_copies_beyond_l2_covers_twice_the_cache():
    # no CUDA device named: the 50 MB default L2
    assert bench.copies_beyond_l2(10 << 20, "cpu") == 10
    assert bench.copies_beyond_l2(7 << 20, "cpu") == 15  # ceil(100/7)
    assert bench.copies_beyond_l2(1 << 30, "cpu") == 2  # never fewer than two
    assert bench.copies_beyond_l2(1 << 30, "cpu", at_least=1) == 1


def test_graph_time_without_cuda_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA device"):
        bench.graph_time(lambda: None)
    with pytest.raises(ValueError, match="at least one"):
        bench.graph_time([])


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_graph_time_counts_the_calls_it_divides_by():
    x = torch.zeros(1024, device="cuda")
    fns = [lambda: x.add_(1), lambda: x.add_(2)]
    timing = bench.graph_time(fns, rounds=4, warmup=1, min_replay_s=1e-4, max_calls=64)
    # a tiny kernel: the sequence is repeated until the replay is long enough, within the cap
    assert 2 < timing.calls_per_round <= 64 and timing.calls_per_round % 2 == 0
    # per call = a replay's time / the calls in it: timed independently, they agree
    passes = timing.calls_per_round // 2
    replay = bench.graphed(lambda: [f() for _ in range(passes) for f in fns])
    whole = bench.time_callable(replay, rounds=10, warmup=2).median
    assert timing.median * timing.calls_per_round == pytest.approx(whole, rel=0.3)
    single = bench.time_callable(bench.graphed(fns[0]), rounds=10, warmup=2)
    assert timing.median < single.median  # the replay's launch is no longer in the figure
