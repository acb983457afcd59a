"""The fused Triton kernel against the plain-torch reference. On CPU this runs through Triton's
interpreter (scripts/test.sh sets TRITON_INTERPRET=1); on a GPU it runs the compiled kernel."""

import pytest
import torch

from layerzip_lowrank.backends import TritonBackend, lowrank_matmul_reference
from layerzip.testing import triton_test_device

DEVICE = triton_test_device()
ON_GPU = DEVICE == "cuda"


@pytest.mark.parametrize("t,n,m,r,bias", [
    (5, 24, 40, 3, True),      # nothing a multiple of a tile
    (33, 64, 48, 16, False),
    (16, 32, 32, 40, True),    # r larger than one BKR tile, not a power of two
    (2, 7, 3, 1, True),        # degenerate sizes
])
def test_matches_reference_fp32(t, n, m, r, bias):
    g = torch.Generator().manual_seed(t * 1000 + n)
    x = torch.randn(t, n, generator=g).to(DEVICE)
    u = torch.randn(m, r, generator=g).to(DEVICE)
    v = torch.randn(n, r, generator=g).to(DEVICE)
    b = torch.randn(m, generator=g).to(DEVICE) if bias else None
    ref = lowrank_matmul_reference(x.double(), u.double(), v.double(),
                                   None if b is None else b.double())
    out = TritonBackend()(x, u, v, b)
    assert out.shape == ref.shape and out.dtype == x.dtype
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < 1e-5, rel  # float32 runs IEEE dots, like torch's default matmul


def test_leading_dimensions_and_non_contiguous_inputs():
    x = torch.randn(2, 3, 20, device=DEVICE)
    u = torch.randn(7, 18, device=DEVICE)[:, :5]       # non-contiguous factor view
    v = torch.randn(5, 20, device=DEVICE).t()          # transposed storage
    out = TritonBackend()(x, u, v, None)
    ref = lowrank_matmul_reference(x.double(), u.double(), v.double(), None)
    assert out.shape == (2, 3, 7)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_fresh_random_inputs_every_element_written():
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(19, 48, generator=g).to(DEVICE)
        u = torch.randn(36, 8, generator=g).to(DEVICE)
        v = torch.randn(48, 8, generator=g).to(DEVICE)
        out = TritonBackend()(x, u, v, None)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, lowrank_matmul_reference(x, u, v, None),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not ON_GPU, reason="Triton's CPU interpreter (3.9) computes bf16 dots wrongly; the same "
                           "kernel is checked in bf16 on the GPU by benchmarks/device_run.sh")),
])
def test_half_precision_inputs(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 64, generator=g).to(DEVICE, dtype)
    u = torch.randn(48, 16, generator=g).to(DEVICE, dtype)
    v = torch.randn(64, 16, generator=g).to(DEVICE, dtype)
    out = TritonBackend()(x, u, v, None)
    ref = lowrank_matmul_reference(x.double(), u.double(), v.double(), None)
    assert out.dtype == dtype
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2  # half-precision h


def test_module_uses_triton_for_inference_and_reference_for_training():
    from layerzip_lowrank import LowRankLinear

    m = LowRankLinear(12, 10, 4, backend="triton").to(DEVICE)
    with torch.no_grad():
        m.u.normal_()
        m.v.normal_()
    x = torch.randn(3, 10, device=DEVICE)
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y, lowrank_matmul_reference(x, m.u, m.v, m.bias),
                               rtol=2e-2 if ON_GPU else 1e-5, atol=2e-2 if ON_GPU else 1e-5)
    x.requires_grad_(True)
    m(x).sum().backward()  # falls back to the differentiable reference
    assert m.u.grad is not None and x.grad is not None
    m.u.grad = None
    m(torch.randn(3, 10, device=DEVICE)).sum().backward()  # only the weights need gradients
    assert m.u.grad is not None and torch.isfinite(m.u.grad).all()


def test_auto_never_picks_the_interpreter():
    import layerzip

    if not ON_GPU:
        assert layerzip.get_backend("lowrank_matmul").name == "torch"


def test_compiled_module_holds_the_fused_kernel_as_one_op():
    # under torch.compile the fused kernel is the custom op layerzip_lowrank::fused (ops.py)
    from layerzip_lowrank import LowRankLinear

    m = LowRankLinear(48, 40, 8, backend="triton").to(DEVICE)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in (m.u, m.v, m.bias):
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(2, 24, 40, generator=g).to(DEVICE)
        out = torch.compile(m, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(out, m(x), rtol=0, atol=0)
        ref = lowrank_matmul_reference(x.double(), m.u.double(), m.v.double(), m.bias.double())
    # a norm-relative error: elementwise tolerances fail by chance where terms cancel
    assert float((out.double() - ref).norm() / ref.norm()) < (1e-2 if ON_GPU else 1e-6)
    assert sum("layerzip_lowrank.fused" in s for s in seen) == 1, seen
