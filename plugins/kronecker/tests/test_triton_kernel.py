"""The fused Kronecker Triton kernel against the plain-torch reference (CPU: interpreter)."""

import pytest
import torch

from layerzip_kronecker.module import kron_matmul_reference
from layerzip_kronecker.plugin import TritonKronBackend
from layerzip.testing import triton_test_device

DEVICE = triton_test_device()


@pytest.mark.parametrize("t,f1,f2,r,frac,bias", [
    (5, (4, 3), (5, 6), 1, 0.0, True),     # nothing a power of two
    (9, (16, 16), (16, 16), 2, 0.0, False),
    (3, (8, 4), (2, 32), 3, 0.05, True),   # with a residual
])
def test_matches_reference(t, f1, f2, r, frac, bias):
    g = torch.Generator().manual_seed(t)
    (m1, n1), (m2, n2) = f1, f2
    m, n = m1 * m2, n1 * n2
    x = torch.randn(t, n, generator=g).to(DEVICE)
    a = torch.randn(r, m1, n1, generator=g).to(DEVICE)
    b = torch.randn(r, m2, n2, generator=g).to(DEVICE)
    nnz = int(frac * m * n)
    idx = torch.randperm(m * n, generator=g)[:nnz].sort().values.to(DEVICE, torch.int32)
    val = torch.randn(nnz, generator=g).to(DEVICE)
    bb = torch.randn(m, generator=g).to(DEVICE) if bias else None
    ref = kron_matmul_reference(x.double(), a.double(), b.double(), idx, val.double(),
                                None if bb is None else bb.double())
    out = TritonKronBackend()(x, a, b, idx, val, bb)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_half_precision_and_leading_dims():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 256, generator=g).to(DEVICE, torch.float16)
    a = torch.randn(1, 16, 16, generator=g).to(DEVICE, torch.float16)
    b = torch.randn(1, 16, 16, generator=g).to(DEVICE, torch.float16)
    out = TritonKronBackend()(x, a, b, None, None, None)
    ref = kron_matmul_reference(x.double(), a.double(), b.double(), None, None, None)
    assert out.shape == (2, 3, 256)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("t,f1,f2,r,frac", [
    (6, (4, 3), (5, 6), 1, 0.0),      # rectangular factors, nothing a power of two
    (4, (8, 16), (16, 8), 3, 0.05),   # several terms and a residual
])
def test_gradients_match_the_reference(t, f1, f2, r, frac):
    g = torch.Generator().manual_seed(11 + t)
    (m1, n1), (m2, n2) = f1, f2
    m, n = m1 * m2, n1 * n2
    nnz = int(frac * m * n)
    idx = torch.randperm(m * n, generator=g)[:nnz].sort().values.to(DEVICE, torch.int32)
    leaves = [torch.randn(2, t, n, generator=g), torch.randn(r, m1, n1, generator=g),
              torch.randn(r, m2, n2, generator=g), torch.randn(nnz, generator=g),
              torch.randn(m, generator=g)]
    dy = torch.randn(2, t, m, generator=g).to(DEVICE)

    def grads(fn):
        xs = [v.to(DEVICE).requires_grad_(True) for v in leaves]
        x, a, b, val, bias = xs
        (fn(x, a, b, idx, val, bias) * dy).sum().backward()
        return [v.grad for v in xs]

    got = grads(TritonKronBackend())
    want = grads(kron_matmul_reference)
    for name, gv, wv in zip(("x", "a", "b", "residual", "bias"), got, want, strict=True):
        if name == "residual" and not nnz:
            assert gv is None and wv is None  # no residual: nothing to differentiate
            continue
        assert gv is not None, name
        assert float((gv - wv).norm() / wv.norm().clamp_min(1e-12)) < 1e-5, name


def test_module_trains_through_the_triton_backend():
    from layerzip_kronecker.module import KroneckerLinear

    layer = KroneckerLinear(64, 32, [[8, 4], [8, 8]], rank=2, backend="triton").to(DEVICE)
    with torch.no_grad():
        for p in (layer.a, layer.b):
            p.normal_()
    x = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    assert layer._kernel.accepts(x, layer.a, layer.b)  # no fallback to the reference
    layer(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (layer.a, layer.b))
    assert x.grad is not None


def test_kernel_adds_to_out_in_place():
    # out=: y += Σ (Aₖ ⊗ Bₖ) x (the column residual's path), leading dimensions kept
    from layerzip_kronecker.triton_kernel import kron_fused

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 12, generator=g).to(DEVICE)
    a = torch.randn(2, 5, 3, generator=g).to(DEVICE)
    b = torch.randn(2, 6, 4, generator=g).to(DEVICE)
    start = torch.randn(2, 7, 30, generator=g).to(DEVICE)
    out = start.clone()
    assert kron_fused(x, a, b, out=out) is out
    want = start.double() + kron_matmul_reference(x.double(), a.double(), b.double(), None,
                                                  None, None)
    assert float((out.double() - want).norm() / want.norm()) < 1e-5
    with pytest.raises(ValueError, match=r"out must be a contiguous .* shape \(2, 7, 30\)"):
        kron_fused(x, a, b, out=start.transpose(0, 1))
    with pytest.raises(ValueError, match="out must be a contiguous"):  # right shape, strided
        kron_fused(x, a, b, out=start.permute(2, 1, 0).contiguous().permute(2, 1, 0))


def _factored_layer(seed, t, f1, f2):
    """A generator, x (t, n1·n2) and one Kronecker term a (1, m1, n1), b (1, m2, n2)."""
    g = torch.Generator().manual_seed(seed)
    (m1, n1), (m2, n2) = f1, f2
    x = torch.randn(t, n1 * n2, generator=g).to(DEVICE)
    a = torch.randn(1, m1, n1, generator=g).to(DEVICE)
    b = torch.randn(1, m2, n2, generator=g).to(DEVICE)
    return g, x, a, b


def _assert_both_residual_paths(x, a, b, idx, vals, bias, want):
    """Without gradients the backend's own residual path gives ``want``; with them it takes
    the differentiable torch form, whose gradient in the residual's values it must match."""
    with torch.no_grad():
        out = TritonKronBackend()(x, a, b, idx, vals, bias)
    assert float((out.double() - want).norm() / want.norm()) < 1e-5
    vals.requires_grad_(True)
    (gv,) = torch.autograd.grad(TritonKronBackend()(x, a, b, idx, vals, bias).sum(), vals)
    (ref,) = torch.autograd.grad(kron_matmul_reference(x, a, b, idx, vals, bias).sum(), vals)
    torch.testing.assert_close(gv, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t,f1,f2,nb", [
    (37, (4, 3), (5, 6), 5),     # nothing a power of two; several blocks in one block row
    (20, (8, 4), (16, 16), 12),  # blocks in most block rows, a token tail
])
def test_block_residual_kernel_matches_the_torch_form(t, f1, f2, nb):
    g, x, a, b = _factored_layer(nb, t, f1, f2)
    (m1, n1), (m2, n2) = f1, f2
    blocks = torch.randperm(m1 * n1, generator=g)[:nb].sort().values.to(DEVICE, torch.int32)
    vals = torch.randn(nb, m2, n2, generator=g).to(DEVICE)
    bias = torch.randn(m1 * m2, generator=g).to(DEVICE)
    want = kron_matmul_reference(x.double(), a.double(), b.double(), blocks, vals.double(),
                                 bias.double())
    _assert_both_residual_paths(x, a, b, blocks, vals, bias, want)


@pytest.mark.parametrize("t,f1,f2,k", [(37, (4, 3), (5, 6), 3), (20, (8, 4), (16, 16), 9)])
def test_column_residual_matches_the_torch_form(t, f1, f2, k):
    # whole input columns: without gradients the residual's product first, the kernel adding
    # to it; checked against the dense layer with those columns added
    g, x, a, b = _factored_layer(k, t, f1, f2)
    (m1, n1), (m2, n2) = f1, f2
    cols = torch.randperm(n1 * n2, generator=g)[:k].sort().values.to(DEVICE, torch.int32)
    vals = torch.randn(m1 * m2, k, generator=g).to(DEVICE)
    bias = torch.randn(m1 * m2, generator=g).to(DEVICE)
    dense = torch.einsum("ij,ab->iajb", a[0].double(), b[0].double()).reshape(m1 * m2, -1)
    dense[:, cols.long()] += vals.double()
    _assert_both_residual_paths(x, a, b, cols, vals, bias, x.double() @ dense.t() + bias.double())


def test_config_pruning_keeps_tiles_that_fit(monkeypatch):
    """The GPU autotuner's candidates (pruned per shape; the interpreter skips pruning)."""
    import triton

    from layerzip_kronecker import triton_kernel as tk

    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setattr(tk, "QUICK", False)
    configs = [triton.Config({"TB": tb, "OCC": 2}, num_warps=w, num_stages=3)
               for tb in (1, 2, 4, 8, 16) for w in (4, 8)]
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)

    def kept(x, size):
        args = {"x_ptr": x, "BM1": size, "BN1": size, "BM2": size, "BN2": size}
        return {(c.kwargs["TB"], c.num_warps) for c in tk._prune(configs, args)}

    # 64-wide factors: TB·64 ∈ {64, 128}; TB = 2 with 4 warps is at the register limit
    assert kept(bf16, 64) == {(1, 4), (1, 8), (2, 4), (2, 8)}
    # 16-wide factors need more tokens per tile for a 64- or 128-wide dot
    assert {tb for tb, _ in kept(bf16, 16)} == {4, 8}
    # nothing fits: the smallest tile with the most warps, so the autotuner has one to run
    assert kept(fp32, 512) == {(1, 8)}


@pytest.mark.parametrize("r,tb,accumulate", [(1, 1, False), (4, 2, False), (1, 1, True)])
def test_forward_kernel_compiles_for_hopper_with_tensor_core_dots(r, tb, accumulate):
    # the interpreter runs the kernel as Python; compiled for sm_90 (64×64 ⊗ 64×64, bf16, with
    # token tiles the autotuner keeps for that shape), its products are Hopper tensor-core
    # wgmma instructions, its x tiles move by 16-byte loads or async copies, and nothing spills
    # (also when it adds to y: the column residual's path)
    pytest.importorskip("triton")
    from layerzip.testing import compile_ptx

    sig = {**{p: "*bf16" for p in ("x_ptr", "a_ptr", "b_ptr", "y_ptr")},
           **{p: "i32" for p in ("T", "T_BUCKET", "M1", "N1", "M2", "N2")},
           **{p: "constexpr" for p in ("R", "BM1", "BN1", "BM2", "BN2", "PRECISION", "TB",
                                       "OCC", "ACCUMULATE")}}
    ptx = compile_ptx("layerzip_kronecker.triton_kernel", "_kron_fwd", sig,
                      {"R": r, "BM1": 64, "BN1": 64, "BM2": 64, "BN2": 64,
                       "PRECISION": "ieee", "TB": tb, "OCC": 2, "ACCUMULATE": accumulate},
                      divisible=("x_ptr", "a_ptr", "b_ptr", "y_ptr", "T", "M1", "N1", "M2",
                                 "N2"))
    assert "wgmma.mma_async" in ptx
    assert "ld.global.v4" in ptx or "cp.async" in ptx
    assert ".local" not in ptx
