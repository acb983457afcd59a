"""The FP8 path (fp8_kernel.py): x and h quantized per row by a Triton kernel and two fp8 GEMMs
(cuBLAS on the GPU, torch's CPU kernel here). Checked twice: against an emulation of exactly that
quantization in float64 (tight: the kernels implement the scheme) and against the exact product
(loose: what e4m3 costs). On the CPU through Triton's interpreter, which emulates e4m3."""

import pytest
import torch

from layerzip.testing import triton_test_device
from layerzip_lowrank.backends import FP8Backend
from layerzip_lowrank.fp8_kernel import (FP8_MAX, fp8_lowrank, quantize_activation_rows,
                                         quantize_factors)

DEVICE = triton_test_device()


def case(t, n, m, r, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g)
    x[t // 2, 3] = 300.0  # an outlier: its row's scale follows it
    u = torch.randn(m, r, generator=g) / r ** 0.5
    v = torch.randn(n, r, generator=g) / n ** 0.5
    b = torch.randn(m, generator=g) if bias else None
    on = dict(device=DEVICE, dtype=torch.bfloat16)
    return x.to(**on), u.to(**on), v.to(**on), None if b is None else b.to(**on)


def e4m3(t):
    return t.float().to(torch.float8_e4m3fn).double()


def emulated_rows(t):
    """t with each row scaled to ±448, rounded to e4m3 and scaled back."""
    td = t.double().cpu()
    s = td.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / FP8_MAX
    return e4m3(td / s) * s


def rel(out, ref):
    return float((out.double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("t,n,m,r,bias", [
    (37, 304, 70, 40, True),     # r and m not multiples of 16: padded
    (64, 256, 128, 32, False),
    (130, 512, 96, 64, True),
])
def test_whole_path_against_the_exact_product(t, n, m, r, bias):
    x, u, v, b = case(t, n, m, r, bias, seed=m)
    f = quantize_factors(u, v)  # r and m padded to multiples of 16 for cuBLAS
    assert f.vq.shape[0] % 16 == 0 and f.uq.shape[0] % 16 == 0
    y = fp8_lowrank(x, f, b)
    assert y.shape == (t, m) and y.dtype == x.dtype
    exact = (x.double() @ v.double()) @ u.double().t()
    if b is not None:
        exact = exact + b.double()
    assert rel(y, exact.cpu()) < 0.1
    # the same scheme in float64: what remains is rounding order and bf16 outputs
    w1 = e4m3(f.vq.cpu()) * f.vs.double().cpu()[:, None]
    h = (emulated_rows(x) @ w1.t()).to(torch.bfloat16)
    emulated = (emulated_rows(h) @ (e4m3(f.uq.cpu()) * f.us.double().cpu()[:, None]).t()
                )[:, :m]
    if b is not None:
        emulated = emulated + b.double().cpu()
    assert rel(y, emulated) < 1e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="the backend runs on CUDA GPUs of cc ≥ 8.9")
def test_backend_quantizes_the_factors_once_per_version():
    x, u, v, b = case(64, 256, 128, 32, True, seed=5)
    be = FP8Backend()
    first = be.factors(u, v)
    assert be.factors(u, v) is first
    with torch.no_grad():
        u.mul_(2)  # a new version of u: quantized again
    assert be.factors(u, v) is not first
    out = be(x, u, v, b)
    exact = (x.double() @ v.double()) @ u.double().t() + b.double()
    assert rel(out, exact.cpu()) < 0.1


def test_factor_cache_follows_the_tensor_not_its_id():
    # the cache lives as long as the layer's u: a dead u's entry goes with it, so a new tensor
    # that gets the same id and address is quantized afresh
    be = FP8Backend()
    u, v = torch.randn(32, 16), torch.randn(48, 16)
    f = be.factors(u, v)
    assert be.factors(u, v) is f and len(be._cache) == 1
    del u, f
    import gc
    gc.collect()
    assert not be._cache


def test_row_quantization_round_trips():
    h = torch.randn(50, 96, device=DEVICE, dtype=torch.bfloat16) * torch.logspace(
        -3, 3, 50, device=DEVICE)[:, None].to(torch.bfloat16)  # rows of very different scales
    q, s = quantize_activation_rows(h)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (50, 1)
    back = q.double() * s.double()
    # e4m3 keeps 3 mantissa bits: each entry within 1/16 of its row's largest magnitude
    err = (back - h.double()).abs() / h.double().abs().amax(dim=1, keepdim=True)
    assert float(err.max()) <= 1 / 16
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((50,), FP8_MAX, device=DEVICE))


def test_quantization_kernel_compiles_to_hardware_conversions():
    # CI runs the kernel only under the interpreter, which takes the ROUND_FIRST branch; the
    # GPU's branch is compiled here for sm_90: it must convert in hardware (cvt …e4m3x2, with
    # saturation), read and write in 16-byte vectors and not spill
    pytest.importorskip("triton")
    from layerzip.testing import compile_ptx

    ptx = compile_ptx("layerzip_lowrank.fp8_kernel", "_quantize_rows_kernel",
                      {"h_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "T": "i32",
                       "R": "i32", "sht": "i32", "shr": "constexpr", "BT": "constexpr",
                       "RP": "constexpr", "ROUND_FIRST": "constexpr"},
                      {"shr": 1, "BT": 16, "RP": 1024, "ROUND_FIRST": False},
                      divisible=("h_ptr", "q_ptr", "s_ptr", "T", "R", "sht"))
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx and ".local" not in ptx


def test_traceable_path_is_the_same_scheme_and_compiles():
    """Under torch.compile the backend runs fp8_lowrank_traceable: the same per-row scheme in
    torch ops. It must agree with the Triton-quantizing path, and compile (fullgraph) to
    itself."""
    from layerzip_lowrank.fp8_kernel import fp8_lowrank_traceable

    x, u, v, b = case(37, 304, 70, 40, True, seed=3)  # r and m padded to multiples of 16
    kernel_path = fp8_lowrank(x, quantize_factors(u, v), b)
    traced_path = fp8_lowrank_traceable(x, u, v, b)
    assert traced_path.shape == kernel_path.shape == (37, 70)
    assert rel(traced_path, kernel_path.double().cpu()) < 1e-2
    compiled = torch.compile(fp8_lowrank_traceable, fullgraph=True)(x, u, v, b)
    assert rel(compiled, traced_path.double().cpu()) < 1e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="the backend runs on CUDA GPUs of cc ≥ 8.9")
def test_compiled_module_runs_fp8_with_its_input_quantized_in_the_graph():
    """A norm followed by an fp8 low-rank layer, compiled whole: the layer stays fp8 (its error
    against float64 is fp8's, not the bf16 reference's it would fall back to). Compiled, x is
    quantized from the norm's fp32 output inside the fused kernel, not from its bf16 rounding:
    the two fp8 results differ by a fraction of fp8's own error."""
    from layerzip_lowrank.module import LowRankLinear

    torch.manual_seed(0)
    layer = LowRankLinear(128, 256, 32, bias=True, backend="fp8", dtype=torch.bfloat16,
                          device="cuda")  # out, in, rank
    with torch.no_grad():
        for p in (layer.u, layer.v, layer.bias):
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    block = torch.nn.Sequential(torch.nn.RMSNorm(256, eps=1e-6), layer).cuda().to(
        torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    exact = ((normed @ layer.v.double()) @ layer.u.double().t() + layer.bias.double()).cpu()
    with torch.no_grad():
        eager_fp8 = block(x)
        layer.set_backend("torch")
        bf16 = block(x)
        layer.set_backend("fp8")
        compiled = torch.compile(block, fullgraph=True)(x)
    assert rel(bf16, exact) < 1e-2
    assert 1e-2 < rel(eager_fp8, exact) < 0.1
    assert 1e-2 < rel(compiled, exact) < 0.1, "compiled, the layer must still run fp8"
    assert rel(compiled, eager_fp8.double().cpu()) < 0.05
