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
