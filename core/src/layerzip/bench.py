"""Timing that is correct on GPUs: CUDA events, warm-up, synchronization, optional L2 flush,
median of rounds; the same interface times CPU code with perf_counter.

With pytest-benchmark, use :func:`pedantic` (or pass ``--benchmark-timer
layerzip.bench.synchronized_timer`` so its own clock waits for the GPU)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    """Seconds per call over ``rounds`` measured rounds."""

    median: float
    mean: float
    min: float
    max: float
    rounds: int
    device: str
    times: list[float] = field(repr=False, default_factory=list)
    #: calls each round made (one CUDA graph replaying several calls); the figures above are
    #: per call, i.e. a round's time divided by this
    calls_per_round: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def synchronized_timer() -> float:
    """perf_counter after draining the current CUDA stream (plain perf_counter on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


_flush_buffers: dict = {}


def graphed(fn: Callable[[], object], *, warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn()`` in a CUDA graph (after ``warmup`` calls on a side stream, as capture
    requires) and return the graph's replay: the GPU's time of ``fn`` without launch overhead
    when timed, and a check that ``fn`` is capturable when run."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graph_time(fns: Callable[[], object] | Sequence[Callable[[], object]], *,
               rounds: int = 20, warmup: int = 3, min_replay_s: float = 2e-4,
               max_calls: int = 256) -> Timing:
    """Per-call GPU time of ``fns`` (one callable, or several run in turn: e.g. the same layer
    over distinct weight copies, so that each call reads its weights from memory rather than
    from L2) captured back to back in one CUDA graph.

    Timing a graph that holds a single short call measures the replay's launch as well: when
    the GPU finishes a call faster than the host can launch the next replay, the events around
    a replay record the host's gap (≈ 10–20 µs), not the kernel. Here the sequence is repeated
    inside the graph until one replay takes at least ``min_replay_s`` of GPU time (at most
    ``max_calls`` calls), so the figures are what a call costs inside a longer graph, as in a
    captured model step. The returned :class:`Timing` is per call."""
    fns = [fns] if callable(fns) else list(fns)
    if not fns:
        raise ValueError("graph_time needs at least one callable")
    if not torch.cuda.is_available():
        raise RuntimeError("graph_time needs a CUDA device (CUDA graphs); time_callable times "
                           "CPU code")

    def one_pass():
        for f in fns:
            f()

    # the probe's fastest round sets the repeat count: a slow round (a host hiccup, clocks
    # still ramping up after idle) must not leave the timed graph short, where its launch
    # would dominate again
    probe = time_callable(graphed(one_pass, warmup=warmup), rounds=10, warmup=10)
    repeat = max(1, min(max(1, max_calls // len(fns)), math.ceil(min_replay_s / probe.min)))

    def passes():
        for _ in range(repeat):
            one_pass()

    replay = graphed(passes, warmup=1)
    # ≥ 25 ms of replays first: an idle GPU runs at a low clock for a while after it wakes
    spin = max(warmup, math.ceil(0.025 / (probe.min * repeat)))
    timing = time_callable(replay, rounds=rounds, warmup=spin)
    calls = repeat * len(fns)
    times = [t / calls for t in timing.times]
    return Timing(statistics.median(times), statistics.fmean(times), min(times), max(times),
                  rounds, timing.device, times, calls)


def copies_beyond_l2(nbytes: int, device: torch.device | str | None = None, *,
                     factor: float = 2.0, at_least: int = 2) -> int:
    """How many distinct copies of ``nbytes`` of weights a sequence of calls needs so that,
    taken in turn, each call reads its weights from device memory and not from the L2 cache
    that the previous calls filled (``factor`` × the L2 size in all)."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    l2 = 50 << 20
    if dev.type == "cuda" and torch.cuda.is_available():
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", l2) or l2
    return max(at_least, math.ceil(factor * l2 / max(1, nbytes)))


def distinct_copies(args: Sequence, device: torch.device | str | None = None, *,
                    at_least: int = 1, at_most: int = 64) -> list[tuple]:
    """``args`` and copies of it whose tensors are clones (other items shared), enough that
    calls taking the copies in turn read their tensors from device memory, not from the L2
    cache the previous calls filled (:func:`copies_beyond_l2` of the tensors' bytes, between
    ``at_least`` and ``at_most`` copies in all). Timing one layer's calls over the copies
    measures what the layer costs inside a model, whose weights do not stay in L2 from one
    call of the layer to the next. On a CPU the list holds ``args`` alone."""
    args = tuple(args)
    nbytes = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" or nbytes == 0:
        return [args]
    k = min(at_most, copies_beyond_l2(nbytes, dev, at_least=at_least))
    return [args] + [tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a
                           for a in args) for _ in range(k - 1)]


def wake_gpu(seconds: float = 0.05, device: torch.device | str | None = None) -> None:
    """Keep the GPU busy with matmuls for about ``seconds``: after an idle stretch (the host
    compiling or autotuning a kernel) it runs at a low clock for a while, and the first timed
    rounds would measure the clock, not the code. A no-op without CUDA."""
    if not torch.cuda.is_available():
        return
    dev = torch.device(device) if device is not None else torch.device(
        "cuda", torch.cuda.current_device())
    a = torch.randn(2048, 2048, device=dev, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            a = a @ a
            a = a / a.norm()
        torch.cuda.synchronize(dev)


def host_time(fn: Callable[[], object], *, calls: int = 100, warmup: int = 5) -> float:
    """Seconds of host time per call, enqueueing ``calls`` calls without waiting for the GPU:
    what a call costs the CPU, the floor of its eager time whatever the kernel (an eager
    timing near this number is bound by the host, not by the kernel)."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return elapsed / calls


def flush_l2(device: torch.device) -> None:
    """Overwrite a buffer twice the L2 size so the next round starts with a cold cache."""
    buf = _flush_buffers.get(device)
    if buf is None:
        props = torch.cuda.get_device_properties(device)
        size = max(getattr(props, "L2_cache_size", 50 << 20), 1 << 20) * 2
        buf = _flush_buffers[device] = torch.empty(size, dtype=torch.uint8, device=device)
    buf.zero_()


def time_callable(fn: Callable[[], object], *, rounds: int = 20, warmup: int = 3,
                  flush: bool = False, device: torch.device | str | None = None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``rounds`` timed ones. On CUDA each round
    is bracketed by events on the current stream (optionally after an L2 flush, untimed)."""
    if rounds < 1:
        raise ValueError("rounds must be ≥ 1")
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
        else torch.device("cpu"))
    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        for s, e in zip(starts, ends):
            if flush:
                flush_l2(dev)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        name = torch.cuda.get_device_name(dev)
    else:
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        name = "cpu"
    return Timing(statistics.median(times), statistics.fmean(times), min(times), max(times),
                  rounds, name, times)


def pedantic(benchmark, fn: Callable[[], object], *, rounds: int = 20, warmup: int = 3,
             flush: bool = False) -> Timing:
    """Run ``fn`` under pytest-benchmark's pedantic mode (its stats, compare and storage
    machinery) with a clock that waits for the GPU, and also time it with CUDA events; the
    event-timed :class:`Timing` goes into ``benchmark.extra_info['timing']`` and is returned."""
    timing = time_callable(fn, rounds=rounds, warmup=warmup, flush=flush)

    def target():
        fn()
        synchronized_timer()

    benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info["timing"] = {k: v for k, v in timing.to_dict().items() if k != "times"}
    return timing


def machine_info() -> dict:
    """GPU name and versions of torch / triton / CUDA, for benchmark records."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
