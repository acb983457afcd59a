import pytest
import torch

import layerzip
from layerzip import DenseWeightView, FitContext
from layerzip.testing import decaying_weight
from layerzip_nystrom import KroneckerWeightView, L2Pivots, LeveragePivots, leverage_scores
from layerzip_nystrom.method import Nystrom, NystromParams


def kron_view(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 3, generator=g), torch.randn(5, 6, generator=g)
    return KroneckerWeightView(a, b), torch.kron(a, b)


def test_kronecker_view_rows_cols_equal_the_materialized_matrix():
    view, w = kron_view()
    idx_r, idx_c = torch.tensor([0, 7, 19]), torch.tensor([1, 10, 17])
    torch.testing.assert_close(view.rows(idx_r), w[idx_r])
    torch.testing.assert_close(view.cols(idx_c), w[:, idx_c])
    torch.testing.assert_close(view.col_norms(), torch.linalg.vector_norm(w, dim=0))
    torch.testing.assert_close(view.row_norms(), torch.linalg.vector_norm(w, dim=1))


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_structure_aware_scores_equal_dense_ones(axis):
    view, w = kron_view(1)
    dense = DenseWeightView(w)
    torch.testing.assert_close(L2Pivots().scores(view, axis), L2Pivots().scores(dense, axis))
    torch.testing.assert_close(LeveragePivots().scores(view, axis).double(),
                               leverage_scores(w, axis), rtol=1e-5, atol=1e-7)
    assert LeveragePivots().scores(dense, axis).sum() == pytest.approx(3 * 5 if axis == "rows"
                                                                         else 3 * 5, rel=1e-6)


@pytest.mark.parametrize("name", ["uniform", "l2", "leverage"])
def test_sampling_is_seeded_and_respects_replace(name):
    view, _ = kron_view(2)
    s = layerzip.get_pivot_strategy(name)
    a = s.select(view, 10, "cols", generator=torch.Generator().manual_seed(3))
    b = s.select(view, 10, "cols", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.unique().numel() == 10
    c = s.select(view, 40, "cols", generator=torch.Generator().manual_seed(3), replace=True)
    assert c.numel() == 40 and c.max() < 18


@pytest.mark.parametrize("name", ["uniform", "l2", "leverage"])
def test_error_falls_as_rank_grows(name):
    w = decaying_weight(60, 40, decay=0.8, seed=4)
    view = DenseWeightView(w)
    errs = []
    for k in (2, 8, 20, 40):
        # average over seeds: sampled pivots make one draw noisy
        e = 0.0
        for seed in range(5):
            m = Nystrom().fit(view, NystromParams(rank=k, pivots=name, middle="optimal"),
                              FitContext("l", seed=seed))
            e += float(torch.linalg.matrix_norm(w - m.dense_weight()) / torch.linalg.matrix_norm(w))
        errs.append(e / 5)
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-4, errs


def test_full_rank_nystrom_of_a_kronecker_layer_is_exact_without_materializing():
    view, w = kron_view(5)
    m = Nystrom().fit(view, NystromParams(rank=18, pivots="leverage"), FitContext("k"))
    torch.testing.assert_close(m.dense_weight(), w, rtol=1e-4, atol=1e-4)


def test_intersection_middle_is_exact_at_full_rank_but_optimal_is_never_worse():
    w = decaying_weight(48, 32, decay=0.8, seed=6)
    view = DenseWeightView(w)
    for k in (4, 16, 32):
        errs = {}
        for middle in ("intersection", "optimal"):
            m = Nystrom().fit(view, NystromParams(rank=k, pivots="leverage", middle=middle),
                              FitContext("l", seed=1))
            errs[middle] = float(torch.linalg.matrix_norm(w - m.dense_weight())
                                 / torch.linalg.matrix_norm(w))
        assert errs["optimal"] <= errs["intersection"] + 1e-6, (k, errs)
    assert errs["intersection"] < 1e-4  # k = 32 = min(m, n): every column is a pivot
