"""The decode kernel (persistent, split-K, grid barrier) against the plain-torch reference. On the
CPU it runs through Triton's interpreter as two launches (the interpreter runs programs one
after another, so a grid barrier cannot be crossed there); on a GPU both the fused one-launch
path and the two-launch path run, eagerly and replayed from a CUDA graph."""

import re

import pytest
import torch

from layerzip.testing import triton_test_device
from layerzip_lowrank.backends import TritonDecodeBackend, lowrank_matmul_reference
from layerzip_lowrank.decode_kernel import lowrank_decode

DEVICE = triton_test_device()
ON_GPU = DEVICE == "cuda"
FUSED = [False, True] if ON_GPU else [False]
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]  # interpreter: no bf16


# how calls share the scratch: one h, or two alternating by call (the default)
SCRATCH = pytest.mark.parametrize("scratch", [{"hbuf": 1}, {}], ids=["one_h", "two_h"])


def case(t, n, m, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g).to(DEVICE, dtype)
    u = (torch.randn(m, r, generator=g) / r ** 0.5).to(DEVICE, dtype)
    v = (torch.randn(n, r, generator=g) / n ** 0.5).to(DEVICE, dtype)
    b = torch.randn(m, generator=g).to(DEVICE, dtype) if bias else None
    return x, u, v, b


def rel_error(out, x, u, v, b):
    ref = lowrank_matmul_reference(x.double(), u.double(), v.double(),
                                   None if b is None else b.double())
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,m,r,bias", [
    (1, 96, 80, 24, True),     # one row; r not a power of two
    (5, 200, 72, 40, False),   # nothing a multiple of a tile
    (16, 256, 256, 64, True),
    (64, 128, 48, 16, True),   # the most rows it takes
])
def test_matches_reference(fused, dtype, t, n, m, r, bias):
    x, u, v, b = case(t, n, m, r, dtype, bias, seed=t + n)
    out = lowrank_decode(x, u, v, b, fused=fused)
    assert out.shape == (t, m) and out.dtype == dtype
    assert rel_error(out, x, u, v, b) < 1e-2  # h is rounded to the input dtype, as in torch


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("prefetch", [1, 2], ids=["u_tile", "u_tile_and_bias"])
@pytest.mark.parametrize("bn", [16, 32])
@pytest.mark.parametrize("t,n,m,r,bias", [
    (3, 96, 80, 24, True),     # r not a power of two: U's rows beyond r are masked
    (16, 256, 200, 64, False),  # more output tiles than programs: some take a second tile
])
def test_prefetched_first_tile_matches_reference(fused, prefetch, bn, t, n, m, r, bias):
    # the first output tile of U (and with prefetch=2 its bias) is loaded before phase 1;
    # later tiles the ordinary way
    x, u, v, b = case(t, n, m, r, torch.float16, bias, seed=t + m)
    out = lowrank_decode(x, u, v, b, fused=fused,
                         tiles={"prefetch": prefetch, "bn": bn})
    assert rel_error(out, x, u, v, b) < 1e-2


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("tw", [0, 24, 40])
@pytest.mark.parametrize("t,n,m,r", [(3, 96, 200, 24), (16, 128, 80, 64)])
def test_ragged_output_tiles_match_reference(fused, tw, t, n, m, r):
    # output tiles narrower than their power-of-two block (tw columns each; 0: the default,
    # one tile per program): lanes past tw are masked, tiles must not overlap or leave gaps
    x, u, v, b = case(t, n, m, r, torch.float16, True, seed=m + tw)
    out = lowrank_decode(x, u, v, b, fused=fused, tiles={"tw": tw, "prefetch": 1})
    assert rel_error(out, x, u, v, b) < 1e-2


@pytest.mark.parametrize("fused", FUSED)
@SCRATCH
def test_repeated_calls_and_shapes_reuse_the_scratch_correctly(fused, scratch):
    # every call must find h zeroed, across layers sharing the scratch: with one h, every
    # layer (the call's last program zeroes it); with two, alternate calls of the layers of one
    # h size (each call zeroes the previous one's) — the first and third shapes share one,
    # the second has its own, so the alternation runs over layers of different n and m
    shapes = ((4, 96, 64, 32), (16, 128, 200, 16), (9, 64, 40, 30))
    for i in range(5):
        for shape in shapes:
            x, u, v, b = case(*shape, torch.float16, seed=i)
            out = lowrank_decode(x, u, v, b, fused=fused, tiles=scratch)
            assert rel_error(out, x, u, v, b) < 1e-2


def test_two_h_alternate_by_epoch_and_each_call_zeroes_the_other():
    # the scratch of hbuf = 2, looked at between calls: a call counts G arrivals, fills the h
    # of its epoch's parity and leaves the other zeroed; the previous call's h is zeroed only
    # by the next call
    from layerzip_lowrank.decode_kernel import _programs, _scratch_for, plan

    x, u, v, b = case(4, 96, 64, 32, torch.float16)
    dev = x.device  # (with its index: the scratch is kept per device)
    g = _programs(dev)
    p = plan(4, 96, 64, 32, g, hbuf=2)
    h, counter = _scratch_for(dev, p["BT"], p["RP"], g, False, 2)
    halves = h.view(2, -1)
    start = int(counter)
    for call in range(3):
        lowrank_decode(x, u, v, b, fused=False, tiles={"hbuf": 2})
        epoch = (start // g) + call
        assert int(counter) == (epoch + 1) * g
        used = halves[epoch % 2].view(p["BT"], p["RP"])
        # this call's h holds x @ v (fp32 sums), the other one is zero
        assert torch.allclose(used[:4, :32].cpu(), (x.float() @ v.float()).cpu(), atol=1e-2)
        assert not used[4:].any() and not used[:, 32:].any()
        assert not halves[(epoch + 1) % 2].any()


def test_k_chunks_are_the_measured_ones_on_an_h100():
    # about one phase-1 unit per program on 132 SMs: the power of two nearest to n·4 / 132
    # (results/lowrank_decode_tune_kc.md: rounding up to 512 at 11008 was slower)
    from layerzip_lowrank.decode_kernel import plan

    assert plan(16, 4096, 4096, 256, 132)["KC"] == 128
    assert plan(16, 11008, 4096, 256, 132)["KC"] == 256
    assert plan(1, 11008, 4096, 256, 132)["N_UNITS"] == 172


def test_hbuf_is_one_or_two():
    with pytest.raises(ValueError, match="hbuf is 1 or 2"):
        lowrank_decode(*case(4, 32, 32, 16, torch.float16), tiles={"hbuf": 3})


def test_leading_dimensions_and_strided_factors():
    x = torch.randn(2, 3, 64, device=DEVICE).half()
    u = torch.randn(40, 50, device=DEVICE).half()[:, :16]   # non-contiguous view
    v = torch.randn(16, 64, device=DEVICE).half().t()       # transposed storage
    out = lowrank_decode(x, u, v, None)
    assert out.shape == (2, 3, 40)
    assert rel_error(out.reshape(6, 40), x.reshape(6, 64), u, v, None) < 1e-2


def test_trace_is_refused_off_the_one_launch_path():
    # the trace (a GPU diagnostic) needs every program's steps in one launch; the two-launch
    # path, a split launch and a buffer of the wrong type or size are refused, before any work
    x, u, v, b = case(4, 64, 48, 16, torch.float16)
    from layerzip_lowrank.decode_kernel import _programs

    g = _programs(torch.device(DEVICE))
    with pytest.raises(ValueError, match="one-launch GPU path"):
        lowrank_decode(x, u, v, b, fused=False,
                       trace=torch.zeros(g, 8, dtype=torch.int64, device=DEVICE))
    if ON_GPU:
        for trace, tiles in ((torch.zeros(g, 8, dtype=torch.int64, device=DEVICE), {"split": 1}),
                             (torch.zeros(g, 8, dtype=torch.int32, device=DEVICE), {}),
                             (torch.zeros(g - 1, 8, dtype=torch.int64, device=DEVICE), {})):
            with pytest.raises(ValueError, match="int64"):
                lowrank_decode(x, u, v, b, tiles=tiles, trace=trace)


def test_backend_declines_what_it_cannot_run():
    be = TritonDecodeBackend()
    assert be.supports(torch.zeros(64, 8, device=DEVICE, dtype=torch.float16))
    assert not be.supports(torch.zeros(65, 8, device=DEVICE, dtype=torch.float16))  # prefill
    assert not be.supports(torch.zeros(4, 8, device=DEVICE))  # float32
    with pytest.raises(ValueError, match="at most 64 rows"):
        lowrank_decode(*case(65, 32, 32, 16, torch.float16))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@SCRATCH
def test_fused_kernel_replays_from_a_cuda_graph(scratch):
    x, u, v, b = case(16, 512, 384, 64, torch.bfloat16)
    static_x = x.clone()
    lowrank_decode(static_x, u, v, b, tiles=scratch)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lowrank_decode(static_x, u, v, b, tiles=scratch)
    for seed in range(6):  # several epochs (with two h: both, alternately)
        static_x.copy_(torch.randn(16, 512, generator=torch.Generator().manual_seed(seed)
                                   ).to(DEVICE, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, static_x, u, v, b) < 1e-2


@pytest.mark.skipif(not ON_GPU, reason="programmatic dependent launch: a GPU (sm_90) feature")
@pytest.mark.parametrize("mode", [{"split": 0, "hbuf": 1}, {"split": 1, "hbuf": 1},
                                  {"split": 0}, {"split": 1}],
                         ids=["one_launch_one_h", "split_launches_one_h", "one_launch_two_h",
                              "split_launches_two_h"])
@pytest.mark.parametrize("graphed", [False, True])
def test_dependent_launches_wait_for_the_layer_before(graphed, mode):
    # a chain of layers, each launched while the previous may still run (pdl): every layer
    # reads the previous one's output and shares its scratch, so a missing wait shows as wrong
    # numbers; eager and replayed from a CUDA graph. With split, phase 2 is its own dependent
    # launch that must wait for phase 1 (h) and leave h zeroed for the next layer (one h), or
    # count the call (two h: the next layer zeroes this one's h after its own wait).
    n, r, depth = 512, 64, 6
    x = torch.randn(16, n, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    layers = [case(16, n, n, r, torch.bfloat16, seed=i)[1:] for i in range(depth)]

    def chain(inp):
        for u, v, b in layers:
            inp = lowrank_decode(inp, u, v, b, tiles={"pdl": 1, **mode})
        return inp

    ref = x.double()
    for u, v, b in layers:
        ref = lowrank_matmul_reference(ref, u.double(), v.double(), b.double()).to(
            torch.bfloat16).double()  # each layer's output is rounded, as in the chain
    if graphed:
        static = x.clone()
        chain(static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(static)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    else:
        out = chain(x)
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 3e-2



DECODE_SIGNATURE = {
    **{p: "*bf16" for p in ("x_ptr", "v_ptr", "u_ptr", "b_ptr")}, "h_ptr": "*fp32",
    "y_ptr": "*bf16", "sync_ptr": "*i64", "trace_ptr": "*i64",
    **{p: "i32" for p in ("T", "N_IN", "M_OUT", "R", "N_RB", "N_UNITS", "N_TILES", "TW", "G",
                          "sxt", "svn", "sum_", "syt")},
    # unit strides: the launcher specializes an integer argument equal to 1 as a constant
    **{p: "constexpr" for p in ("sxn", "svr", "sur", "sym", "HAS_BIAS", "PHASE", "BT", "KC",
                                "BR", "BN", "BK2", "RP", "PREFETCH", "PDL", "ENDS_CALL",
                                "HBUF", "ZB", "TRACE")}}


@pytest.mark.parametrize("hbuf", [1, 2], ids=["one_h", "two_h"])
@pytest.mark.parametrize("n,m", [(4096, 11008), (4096, 4096), (11008, 4096)])
def test_fused_dependent_launch_compiles_for_hopper(n, m, hbuf):
    # the fused kernel only runs on a GPU: compile it for sm_90 here (the tiles of
    # n→m, r = 256, T = 16 on 132 SMs). Both weight tiles are read before the kernel waits
    # on the one before it (the prefetched U tile first, then V's), and nothing spills. With
    # two h, x's loads are issued before h's epoch is read (not after it: they would wait
    # for it), and the barrier's arrival is the call's only arrival at the counter.
    pytest.importorskip("triton")
    from layerzip.testing import compile_ptx

    from layerzip_lowrank.decode_kernel import plan

    p = plan(16, n, m, 256, 132, hbuf=hbuf)
    assert p["PREFETCH"]
    ptx = compile_ptx("layerzip_lowrank.decode_kernel", "_decode_kernel", DECODE_SIGNATURE,
                      {"HAS_BIAS": True, "PHASE": 0, "PDL": True, "ENDS_CALL": True,
                       "TRACE": False, "sxn": 1,
                       "svr": 1, "sur": 1, "sym": 1,
                       **{k: p[k] for k in ("BT", "KC", "BR", "BN", "BK2", "RP", "PREFETCH",
                                              "HBUF", "ZB")}},
                      num_warps=p["warps"],
                      # what the launcher marks as multiples of 16 at this shape
                      divisible=("x_ptr", "v_ptr", "u_ptr", "b_ptr", "h_ptr", "y_ptr", "T",
                                 "N_IN", "M_OUT", "R", "N_UNITS", "sxt", "svn", "sum_", "syt"))
    wait = ptx.index("griddepcontrol.wait")
    order = "".join(_load_sources(ptx, {"1": "V", "2": "U", "3": "B"}, 0, wait))
    # every thread's 16-byte loads of its V tile (KC × BR) and U tile (RP × BN), and its
    # share of the bias tile, come before the wait: U's and the bias (issued first in the
    # source) first
    per_thread = p["warps"] * 32 * 8
    v, u = "V" * (p["KC"] * p["BR"] // per_thread), "U" * (p["RP"] * p["BN"] // per_thread)
    assert re.fullmatch(f"{u}B+{v}", order), order
    assert ".local" not in ptx
    # from the wait to phase 1's first atomic add into h
    first = "".join(_load_sources(ptx, {"0": "X", "6": "S"}, wait, ptx.index("red.global")))
    x = "X" * (p["BT"] * p["KC"] // per_thread)  # this program's x chunk
    assert first == (x if hbuf == 1 else x + "S"), first
    counter_atomics = re.findall(r"atom\.global\.gpu\.acq_rel\.add\.u64", ptx)
    assert len(counter_atomics) == 3 - hbuf  # the barrier's arrival (+ the end's, one h)


def _load_sources(ptx: str, params: dict[str, str], start: int, end: int) -> list[str]:
    """For each global load in ``ptx[start:end]``, the kernel parameter its address derives
    from (by following the 64-bit registers that compute it back to an ld.param), named by
    ``params`` (parameter index → name); '?' where none of them."""
    import re

    defs = {}
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@%p\d+\s+)?[\w.]+\s+(%rd\d+),\s*(.*);", line)
        if m:
            defs[m.group(1)] = m.group(2)

    def origin(reg, depth=0):
        d = defs.get(reg, "")
        p = re.search(r"_param_(\d+)\]", d)
        if p:
            return params.get(p.group(1), "?")
        for r in re.findall(r"%rd\d+", d) if depth < 16 else []:
            if (o := origin(r, depth + 1)) != "?":
                return o
        return "?"

    return [origin(re.search(r"\[\s*(%rd\d+)", line).group(1))
            for line in ptx[start:end].splitlines()
            if re.search(r"ld(\.volatile)?\.global", line)]


def _graph_ops(module, x, **compile_kw):
    """Compile ``module`` whole (fullgraph: a graph break fails) with a backend that records
    the graph's call targets and runs it; (output, targets)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        out = torch.compile(module, backend=backend, fullgraph=True, **compile_kw)(x)
    return out, seen


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_module_holds_the_decode_kernel_as_one_op(dynamic):
    # under torch.compile the kernel is the custom op layerzip_lowrank::decode (ops.py), not
    # the two-GEMM reference the module fell back to before; its output matches eager
    from layerzip_lowrank import LowRankLinear

    x, u, v, b = case(16, 128, 96, 32, torch.float16, seed=5)
    m = LowRankLinear(96, 128, 32, backend="triton_decode").to(DEVICE, torch.float16)
    with torch.no_grad():
        m.u.copy_(u), m.v.copy_(v), m.bias.copy_(b)
        eager = m(x)
    out, seen = _graph_ops(m, x, dynamic=dynamic)
    assert sum("layerzip_lowrank.decode" in s for s in seen) == 1, seen
    assert not any("linear" in s for s in seen), seen  # no reference GEMMs beside it
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert rel_error(out, x, u, v, b) < 1e-2


@pytest.mark.skipif(not ON_GPU, reason="inductor + CUDA graphs (mode='reduce-overhead')")
def test_compiled_chain_with_cuda_graphs_matches_eager():
    # a chain of decode layers with elementwise ops between them, compiled by inductor and
    # replayed from its CUDA graphs: the kernel's scratch and dependent launches must hold up
    from layerzip_lowrank import LowRankLinear

    layers = torch.nn.ModuleList(
        LowRankLinear(512, 512, 64, backend="triton_decode") for _ in range(4)
    ).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            _, u, v, b = case(16, 512, 512, 64, torch.bfloat16, seed=i)
            layer.u.copy_(u), layer.v.copy_(v), layer.bias.copy_(b)

    def step(x):
        for layer in layers:
            x = x + torch.nn.functional.silu(layer(x))
        return x

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for seed in range(4):  # warm-up, record, replays with new inputs
            x = torch.randn(16, 512, generator=torch.Generator().manual_seed(seed)
                            ).to(DEVICE, torch.bfloat16)
            ref = step(x)
            out = compiled(x).clone()
            assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


@pytest.mark.parametrize("measured", [False, True], ids=["before_measuring", "measured"])
def test_compiled_autotune_uses_its_graph_choice_or_the_reference(measured, monkeypatch):
    # nothing is timed while torch.compile traces: a shape whose graph choice was measured
    # (here set by hand: the CPU cannot time a GPU kernel) compiles to that kernel's op, an
    # unmeasured one to the reference GEMMs
    from layerzip_lowrank import LowRankLinear
    from layerzip_lowrank.backends import LowRankMeasuredBackend

    tuner = LowRankMeasuredBackend()
    monkeypatch.setattr(tuner, "supports", lambda x: True)  # the real one: CUDA inputs only
    x, u, v, b = case(16, 128, 96, 32, torch.float16, seed=9)
    m = LowRankLinear(96, 128, 32).to(DEVICE, torch.float16)
    m._kernel = tuner
    with torch.no_grad():
        m.u.copy_(u), m.v.copy_(v), m.bias.copy_(b)
    if measured:
        key = (x.device, x.dtype, 16, False, *tuner.shape_key(x, m.u, m.v, m.bias))
        tuner.graph_choices[key] = TritonDecodeBackend()
    out, seen = _graph_ops(m, x)
    assert sum("layerzip_lowrank.decode" in s for s in seen) == int(measured), seen
    assert any("linear" in s for s in seen) != measured, seen
    assert rel_error(out, x, u, v, b) < 1e-2
