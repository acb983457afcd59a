"""The persistent GEMM (persistent_gemm.py) against torch: both layouts of B, with and without
bias, plain loads and TMA descriptors, shapes that are not multiples of a tile, more tiles than
programs (the persistent loop), and the backend built on it. On the CPU through Triton's
interpreter."""

import pytest
import torch

from layerzip.testing import triton_test_device
from layerzip_lowrank.backends import PersistentBackend, lowrank_matmul_reference
from layerzip_lowrank.persistent_gemm import persistent_matmul

DEVICE = triton_test_device()
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tma", [False, True], ids=["plain_loads", "tma"])
@pytest.mark.parametrize("b_nk", [False, True], ids=["b_kn", "b_nk"])
@pytest.mark.parametrize("m,k,n,bias", [
    (70, 40, 56, True),     # nothing a multiple of a tile; rows 16-byte aligned (TMA allowed)
    (33, 64, 100, False),   # rows of c not 16-byte aligned: plain loads whatever is asked
    (130, 96, 200, True),   # many tiles per program
])
def test_matches_torch(dtype, tma, b_nk, m, k, n, bias):
    a = rand(m, k, dtype=dtype, seed=m)
    b = rand(n, k, dtype=dtype, seed=n) if b_nk else rand(k, n, dtype=dtype, seed=n)
    bb = rand(n, dtype=dtype, seed=1) if bias else None
    out = persistent_matmul(a, b, bb, b_nk=b_nk, tma=tma)
    ref = a.double() @ (b.double().t() if b_nk else b.double())
    if bias:
        ref = ref + bb.double()
    assert out.shape == (m, n) and out.dtype == dtype
    assert float((out.double() - ref).norm() / ref.norm()) < 5e-3


def test_backend_matches_reference_over_leading_dimensions():
    be = PersistentBackend()
    x = rand(2, 20, 64, dtype=torch.float16, seed=0)
    u, v, b = (rand(48, 16, dtype=torch.float16, seed=1) / 4,
               rand(64, 16, dtype=torch.float16, seed=2) / 8, rand(48, dtype=torch.float16, seed=3))
    assert be.supports(x) and not be.supports(x.float())
    out = be(x, u, v, b)
    ref = lowrank_matmul_reference(x.double(), u.double(), v.double(), b.double())
    assert out.shape == (2, 20, 48)
    assert float((out.double() - ref).norm() / ref.norm()) < 5e-3
