import pytest
import torch

from layerzip_kschain import (
    butterfly_chain,
    chain_dense,
    chain_matmul_bmm,
    closed_form,
    factor_dense,
    factor_matmul,
    rank_chain,
    refine,
)
from layerzip_kschain.chain import random_factors

CHAINS = {
    "butterfly16": butterfly_chain(16),
    "monarch_r2": rank_chain([4, 6], [3, 5], 2),
    "three_r3": rank_chain([2, 3, 4], [5, 2, 3], 3),
    "four_r1": rank_chain([2, 2, 3, 2], [3, 2, 2, 2], 1),
    "four_r2": rank_chain([2, 2, 2, 2], [2, 2, 2, 2], 2),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_closed_form_recovers_any_chain_product_exactly(name):
    pats = CHAINS[name]
    g = torch.Generator().manual_seed(3)
    w = chain_dense(random_factors(pats, generator=g, dtype=torch.float64), pats)
    got = closed_form(w, pats)
    assert [tuple(f.shape) for f in got] == [(p.num_blocks, p.b, p.c) for p in pats]
    err = (chain_dense(got, pats) - w).norm() / w.norm()
    assert err < 1e-12, f"{name}: relative error {err}"


def test_closed_form_two_factors_is_the_optimal_projection():
    """For two factors the fit is a batch of truncated SVDs: its error equals the sum of the
    discarded singular values² of every sub-block — and raising the rank never hurts."""
    pats1 = rank_chain([4, 6], [3, 5], 1)
    w = torch.randn(24, 15, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = []
    for r in (1, 2, 3):
        pats = rank_chain([4, 6], [3, 5], r)
        err.append(float((chain_dense(closed_form(w, pats), pats) - w).norm()))
    assert err[0] > err[1] > err[2] == pytest.approx(0, abs=1e-10)  # r = min(b₂, c₁) = 3
    # sub-blocks of the (1,4,3,5)(4,6,5,1) chain: W[(i1,i2),(j1,j2)] for fixed (i1, j2)
    blocks = w.reshape(4, 6, 3, 5).permute(0, 3, 1, 2)  # (i1, j2, i2, j1)
    tail = torch.linalg.svdvals(blocks)[..., 1:].square().sum().sqrt()
    assert err[0] == pytest.approx(float(tail), rel=1e-10)
    assert len(pats1) == 2


@pytest.mark.parametrize("name", list(CHAINS))
def test_bmm_matches_dense_in_both_layouts(name):
    pats = CHAINS[name]
    g = torch.Generator().manual_seed(5)
    fs = random_factors(pats, generator=g, dtype=torch.float64)
    x = torch.randn(7, pats[0].cols, generator=g, dtype=torch.float64)
    ref = x @ chain_dense(fs, pats).t()
    torch.testing.assert_close(chain_matmul_bmm(x, fs, pats), ref)
    torch.testing.assert_close(chain_matmul_bmm(x.t().contiguous(), fs, pats, True), ref.t())


def test_bmm_backward_matches_dense_autograd():
    p = rank_chain([3, 4], [2, 5], 2)[1]
    g = torch.Generator().manual_seed(2)
    blocks = torch.randn(p.num_blocks, p.b, p.c, generator=g, dtype=torch.float64,
                         requires_grad=True)
    x = torch.randn(6, p.cols, generator=g, dtype=torch.float64, requires_grad=True)
    for batch_last in (False, True):
        xi = x.t() if batch_last else x
        torch.autograd.gradcheck(lambda xx, bb: factor_matmul(xx, bb, p, batch_last), (xi, blocks))
        y = factor_matmul(xi, blocks, p, batch_last)
        gx, gb = torch.autograd.grad(y.square().sum(), (x, blocks))
        yd = (factor_dense(blocks, p) @ (x.t())) if batch_last else x @ factor_dense(blocks, p).t()
        gx2, gb2 = torch.autograd.grad(yd.square().sum(), (x, blocks))
        torch.testing.assert_close(gx, gx2)
        torch.testing.assert_close(gb, gb2)


def test_refine_lowers_the_error_of_a_random_start():
    pats = rank_chain([4, 6], [3, 5], 2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 15, generator=g, dtype=torch.float64)
    start = random_factors(pats, scale_to=float(w.norm()), generator=g)
    fs, losses = refine(start, pats, w, None, steps=300, lr=1e-2, generator=g)
    assert losses[-1] < 0.5 * losses[0]
    before = (chain_dense([f.double() for f in start], pats) - w).norm()
    after = (chain_dense([f.double() for f in fs], pats) - w).norm()
    assert after < before
