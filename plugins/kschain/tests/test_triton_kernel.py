"""The Triton ks_matmul kernels against the bmm reference and dense(), forward and backward, both
layouts (CPU through TRITON_INTERPRET=1 in CI; bf16 on the GPU only)."""

import pytest
import torch

import layerzip
from layerzip.testing import triton_test_device
from layerzip_kschain import KSChainLinear, Pattern, chain_dense, chain_matmul_bmm, factor_dense, \
    factor_matmul, rank_chain

DEVICE = triton_test_device()
ON_GPU = DEVICE == "cuda"
from layerzip_kschain.triton_kernel import factor_forward, ks_chain_triton  # noqa: E402

PATTERNS = [Pattern(2, 3, 5, 4), Pattern(1, 16, 32, 2), Pattern(4, 2, 2, 1), Pattern(2, 20, 24, 3),
            Pattern(2, 5, 3, 8), Pattern(1, 3, 2, 16), Pattern(2, 5, 3, 32),
            Pattern(1, 17, 16, 1)]
if ON_GPU:
    PATTERNS += [Pattern(4, 64, 64, 16), Pattern(1, 256, 128, 8), Pattern(16, 128, 256, 1)]
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_last", [False, True], ids=["bs_first", "bs_last"])
@pytest.mark.parametrize("p", PATTERNS, ids=str)
def test_factor_forward_and_backward_match_the_reference(p, batch_last, dtype):
    g = torch.Generator(device="cpu").manual_seed(hash((p.a, p.b, p.c, p.d)) % 1000)
    t = 37 if not ON_GPU else 1000  # not a multiple of any tile
    w = torch.randn(p.num_blocks, p.b, p.c, generator=g).to(DEVICE, dtype)
    x = torch.randn(t, p.cols, generator=g).to(DEVICE, dtype)
    gy = torch.randn(t, p.rows, generator=g).to(DEVICE, dtype)
    if batch_last:
        x, gy = x.t().contiguous(), gy.t().contiguous()
    ref_w, ref_x = w.double().requires_grad_(), x.double().requires_grad_()
    ref = factor_matmul(ref_x, ref_w, p, batch_last)
    dense = factor_dense(ref_w.detach(), p)
    assert rel(ref.detach(), dense @ ref_x.detach() if batch_last else
               ref_x.detach() @ dense.t()) < 1e-12
    ref.backward(gy.double())
    kw, kx = w.clone().requires_grad_(), x.clone().requires_grad_()
    poisoned = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=dtype)
    factor_forward(x, w, p, batch_last, out=poisoned)  # every element must be written
    assert torch.isfinite(poisoned).all()
    y = ks_chain_triton(kx, [kw], [p], batch_last)
    assert rel(poisoned, y) == 0
    assert rel(y, ref) < TOL[dtype]
    y.backward(gy)
    assert rel(kx.grad, ref_x.grad) < TOL[dtype]
    assert rel(kw.grad, ref_w.grad) < TOL[dtype] * 2


@pytest.mark.parametrize("batch_last", [False, True], ids=["bs_first", "bs_last"])
def test_chain_and_module_with_the_triton_backend(batch_last):
    pats = rank_chain([4, 6], [3, 5], 2)
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(p.num_blocks, p.b, p.c, generator=g).to(DEVICE) for p in pats]
    x = torch.randn(9, pats[0].cols, generator=g).to(DEVICE)
    xi = x.t().contiguous() if batch_last else x
    got = ks_chain_triton(xi, fs, pats, batch_last)
    torch.testing.assert_close(got, chain_matmul_bmm(xi, fs, pats, batch_last), rtol=1e-4,
                               atol=1e-4)
    ref = x @ chain_dense([f.double() for f in fs], pats).t().float()
    torch.testing.assert_close(got.t() if batch_last else got, ref, rtol=1e-4, atol=1e-4)

    m = KSChainLinear(24, 15, pats, backend="triton").to(DEVICE)
    with torch.no_grad():
        for p, f in zip(m.factors, fs):
            p.copy_(f)
    assert m.backend_name == "triton"
    out = m(x)  # weights need gradients: the kernel is differentiable, so it still runs
    out.square().sum().backward()
    grads = [p.grad.clone() for p in m.factors]
    m.zero_grad()
    ref_m = KSChainLinear(24, 15, pats, backend="bmm").to(DEVICE)
    ref_m.load_state_dict(m.state_dict())
    ref_m(x).square().sum().backward()
    for a, b in zip(grads, ref_m.factors):
        torch.testing.assert_close(a, b.grad, rtol=1e-4, atol=1e-4)


def test_cli_trains_with_the_triton_impl(tmp_path):
    from layerzip_kschain.train import TrainConfig, train

    path = tmp_path / "w.pt"
    torch.save(torch.randn(24, 15), path)
    common = dict(weight_path=str(path), rank=2, num_epochs=2, num_samples=128, batch_size=32,
                  device=DEVICE, init="random", lr=1e-2)
    a = train(TrainConfig(**common, impl="triton", output_dir=str(tmp_path / "t"), bs_last=True))
    b = train(TrainConfig(**common, impl="bmm", output_dir=str(tmp_path / "b"), bs_last=True))
    assert a.history[-1]["val_loss"] < a.history[0]["val_loss"]
    assert a.history[-1]["val_loss"] == pytest.approx(b.history[-1]["val_loss"], rel=1e-3)


def test_auto_is_bmm_on_the_cpu_and_the_measured_choice_on_a_gpu():
    assert layerzip.get_backend("ks_matmul").name == ("autotune" if ON_GPU else "bmm")


def test_autotune_keys_patterns_layout_and_batch_last_tokens():
    from layerzip_kschain.plugin import KSMeasuredBackend

    be = KSMeasuredBackend()
    p, q = Pattern(2, 16, 16, 1), Pattern(1, 16, 16, 2)
    x = torch.zeros(32, 100)  # batch-last: 100 tokens in the last dimension
    keys = {be.shape_key(x, [None], [p], True), be.shape_key(x, [None], [q], True),
            be.shape_key(x, [None], [p], False), be.shape_key(torch.zeros(32, 300), [None], [p],
                                                               True)}
    assert len(keys) == 4
    # tokens within one power-of-two bucket share a choice
    assert be.shape_key(torch.zeros(32, 65), [None], [p], True) == be.shape_key(x, [None], [p],
                                                                                True)


def test_autotune_measures_once_and_returns_what_the_chosen_kernel_computes(monkeypatch):
    from layerzip_kschain.plugin import KSMeasuredBackend

    be = KSMeasuredBackend()
    monkeypatch.setattr(be, "supports", lambda x: True)  # measure on whatever device runs tests
    p = Pattern(2, 16, 16, 2)
    w = torch.randn(p.num_blocks, p.b, p.c, device=DEVICE, dtype=torch.float16)
    x = torch.randn(8, p.cols, device=DEVICE, dtype=torch.float16)
    out = be(x, [w], [p], False)
    ref = layerzip.get_backend("ks_matmul", "bmm")(x, [w], [p], False)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    assert len(be.choices) == 1 and next(iter(be.choices.values())).name in ("bmm", "triton")
    be(x, [w], [p], False)
    assert len(be.choices) == 1  # the same shape: no second measurement


@pytest.mark.parametrize("p, batch_last, kernel", [
    (Pattern(2, 16, 16, 1), True, "_FWD_BL"), (Pattern(1, 16, 16, 16), True, "_FWD_BL"),
    (Pattern(2, 16, 16, 1), False, "_FWD"), (Pattern(2, 16, 16, 3), False, "_FWD"),
    (Pattern(1, 16, 16, 2), False, "_FWD_SPLIT"), (Pattern(2, 16, 16, 8), False, "_FWD_SPLIT"),
    (Pattern(2, 16, 16, 32), False, "_FWD_SPLIT"),  # groups of 8 δ, four programs per α
    (Pattern(1, 16, 16, 6), False, "_FWD_3D")], ids=str)
def test_each_layout_and_d_runs_its_kernel(p, batch_last, kernel, monkeypatch):
    """The dispatch of factor_forward (module docstring of triton_kernel): which launch runs."""
    from layerzip_kschain import triton_kernel as k

    names = ("_FWD", "_FWD_BL", "_FWD_SPLIT", "_FWD_3D")
    calls = []
    for name in names:
        launch = getattr(k, name)
        monkeypatch.setattr(k, name, lambda grid, *a, _n=name, _l=launch, **kw:
                            calls.append(_n) or _l(grid, *a, **kw))
    # 16-bit on a GPU (where the split kernel is for 16-bit only), fp32 in the interpreter
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(19, p.cols, device=DEVICE, dtype=dtype)
    x = x.t().contiguous() if batch_last else x
    w = torch.randn(p.num_blocks, p.b, p.c, device=DEVICE, dtype=dtype)
    y = factor_forward(x, w, p, batch_last)
    assert calls == [kernel]
    assert rel(y, factor_matmul(x.double(), w.double(), p, batch_last)) < TOL[dtype]
    if ON_GPU and kernel == "_FWD_SPLIT":  # fp32 tiles are too large: 3-D (d ≥ 4) or 2-D kernel
        calls.clear()
        factor_forward(x.float(), w.float(), p, batch_last)
        assert calls == ["_FWD_3D" if p.d >= k.MIN_D_3D else "_FWD"]


def test_split_kernel_tunes_delta_per_program_only_beyond_8(monkeypatch):
    """δ per program: all of d for d ≤ 8 (one contiguous tile), tuned among 2, 4, 8 beyond;
    the largest under LAYERZIP_TRITON_QUICK (the GPU autotuner's candidates, pruned on CPU)."""
    import triton

    from layerzip_kschain import triton_kernel as k

    monkeypatch.setattr(k, "INTERPRET", False)
    monkeypatch.setattr(k, "QUICK", False)
    configs = [triton.Config({"BT": 64, "BB": 64, "BK": 32, "DG": g}, num_warps=4, num_stages=3)
               for g in (2, 4, 8)]
    x = torch.empty(1, dtype=torch.bfloat16)

    def dgs(d):
        args = {"x_ptr": x, "B": 256, "C": 256, "D": d}
        return {c.kwargs["DG"] for c in k._prune_split(configs, args)}

    assert dgs(4) == {4} and dgs(8) == {8}
    assert dgs(16) == {2, 4, 8} and dgs(64) == {2, 4, 8}
    monkeypatch.setattr(k, "QUICK", True)
    assert dgs(16) == {8}


@pytest.mark.parametrize("groups", [(2,), (2, 4)], ids=["dg2", "dg4"])
def test_split_kernel_with_fewer_delta_per_program(groups, monkeypatch):
    """d = 16 with 2 or 4 δ per program (the GPU autotuner may pick them; the interpreter and
    quick runs use 8): runs of 2 or 4 elements, 8 or 4 programs per α."""
    from layerzip_kschain import triton_kernel as k

    monkeypatch.setattr(k, "SPLIT_D", groups)
    # a fresh autotuner cache and launch cache: the choice for this pattern is made again
    monkeypatch.setattr(k._ks_fwd_split, "cache", {})
    monkeypatch.setattr(k._FWD_SPLIT, "_entries", {})
    p = Pattern(2, 5, 3, 16)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(21, p.cols, device=DEVICE, dtype=dtype)
    w = torch.randn(p.num_blocks, p.b, p.c, device=DEVICE, dtype=dtype)
    assert k.split_group(16) == groups[-1]
    y = factor_forward(x, w, p, False)
    assert rel(y, factor_matmul(x.double(), w.double(), p, False)) < TOL[dtype]
    if not ON_GPU or k.QUICK:  # a full GPU autotune may pick any allowed count
        assert k._ks_fwd_split.best_config.kwargs["DG"] == groups[-1]


@pytest.mark.parametrize("batch_last", [False, True], ids=["bs_first", "bs_last"])
def test_torch_compile_runs_the_kernels_as_custom_ops(batch_last):
    # the compiled graph holds the custom ops (fullgraph: no fallback to eager anywhere), and
    # the compiled forward and backward agree with bmm
    from layerzip_kschain import ops

    pats = [Pattern(2, 16, 16, 2), Pattern(4, 16, 16, 1)]
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(p.num_blocks, p.b, p.c, generator=g).to(DEVICE).requires_grad_()
          for p in pats]
    x = torch.randn(24, pats[-1].cols, generator=g).to(DEVICE)
    x = (x.t().contiguous() if batch_last else x).requires_grad_()
    kernel = layerzip.get_backend("ks_matmul", "triton")
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(lambda x, *ws: kernel(x, list(ws), pats, batch_last),
                             backend=backend, fullgraph=True)
    y = compiled(x, *ws)
    assert any("layerzip_kschain.factor" in s for s in seen), seen
    y.square().sum().backward()
    got = [x.grad.clone()] + [w.grad.clone() for w in ws]
    for t in [x, *ws]:
        t.grad = None
    ref = chain_matmul_bmm(x, list(ws), pats, batch_last)
    ref.square().sum().backward()
    assert rel(y, ref) < 1e-5
    for a, b in zip(got, [x.grad] + [w.grad for w in ws]):
        assert rel(a, b) < 1e-4
    assert ops.factor is not None


def test_compiled_module_holds_the_kernel_op_in_one_graph():
    # the module's forward traces whole (fullgraph) with the triton backend: its factors are
    # taken by index (torch 2.11's dynamo failed unpacking the ParameterList's iterator)
    pats = [Pattern(2, 16, 16, 2), Pattern(4, 16, 16, 1)]
    m = KSChainLinear(64, 64, pats, backend="triton").to(DEVICE)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        for f in m.factors:
            f.normal_()
        x = torch.randn(24, 64, device=DEVICE)
        out = torch.compile(m, backend=backend, fullgraph=True)(x)
        assert rel(out, m(x)) < 1e-6
    assert sum("layerzip_kschain.factor" in s for s in seen) == 2, seen


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs (torch.compile mode='reduce-overhead')")
def test_compiled_module_with_cuda_graphs_matches_eager():
    pats = [Pattern(4, 64, 64, 4), Pattern(16, 64, 64, 1)]
    m = KSChainLinear(1024, 1024, pats, backend="triton").to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        for f in m.factors:
            f.normal_(std=0.125)
        x = torch.randn(512, 1024, device=DEVICE, dtype=torch.bfloat16)
        eager = m(x)
        compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            out = compiled(x)
    assert rel(out, eager) < 1e-2
