import pytest
import torch

from layerzip.testing import decaying_weight
from layerzip_lowrank import AdaptiveLowRankGEMM, LowRankGEMM


def test_full_rank_is_exact_2d_and_3d():
    a = torch.randn(9, 20, dtype=torch.float64)
    b = torch.randn(20, 15, dtype=torch.float64)
    g = LowRankGEMM(target_rank=15, decomposition_method="svd")
    torch.testing.assert_close(g(a, b), a @ b)
    assert g.last_rank == 15
    a3, b3 = torch.randn(4, 9, 20, dtype=torch.float64), torch.randn(4, 20, 15, dtype=torch.float64)
    torch.testing.assert_close(LowRankGEMM(target_rank=15, decomposition_method="svd")(a3, b3),
                               a3 @ b3)
    a3b = torch.randn(4, 9, 20, dtype=torch.float64)
    torch.testing.assert_close(g(a3b, b), a3b @ b)


def test_rank_selection_methods():
    b = decaying_weight(64, 64, decay=0.8)
    a = torch.randn(5, 64)
    g = LowRankGEMM(rank_selection_method="auto")
    g(a, b)
    assert g.last_rank == 8
    g = LowRankGEMM(rank_selection_method="fixed_fraction", fraction=0.25)
    g(a, b)
    assert g.last_rank == 16
    g = LowRankGEMM(rank_selection_method="energy", energy_threshold=0.99,
                    decomposition_method="svd")
    g(a, b)
    s = torch.linalg.svdvals(b.double())
    kept = s[: g.last_rank].square().sum() / s.square().sum()
    assert kept >= 0.99 and s[: g.last_rank - 1].square().sum() / s.square().sum() < 0.99


def test_cache_b_factorizes_once(monkeypatch):
    b = decaying_weight(32, 32)
    g = LowRankGEMM(target_rank=4)
    calls = {"n": 0}
    real = g.factorize

    def counting(x):
        calls["n"] += 1
        return real(x)

    monkeypatch.setattr(g, "factorize", counting)
    for _ in range(3):
        g(torch.randn(2, 32), b)
    assert calls["n"] == 1
    with torch.no_grad():
        b.mul_(2)  # an in-place change invalidates the cache
    g(torch.randn(2, 32), b)
    assert calls["n"] == 2


def test_error_falls_with_rank_and_compute_error():
    b = decaying_weight(64, 48, decay=0.85)
    a = torch.randn(30, 64)
    exact = a @ b
    errs = [LowRankGEMM.compute_error(exact, LowRankGEMM(target_rank=r)(a, b)) for r in (2, 8, 32)]
    assert errs[0] > errs[1] > errs[2]
    assert LowRankGEMM.compute_error(exact, exact) == 0.0


def test_adaptive_returns_rank_meeting_tolerance():
    b = decaying_weight(40, 40, decay=0.7)
    a = torch.eye(40)
    result, r = AdaptiveLowRankGEMM(error_tolerance=0.01)(a, b)
    assert LowRankGEMM.compute_error(b, result) <= 0.01
    _, r_capped = AdaptiveLowRankGEMM(error_tolerance=1e-9, max_rank=5)(a, b)
    assert r_capped == 5 and r > 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank_selection_method"):
        LowRankGEMM(rank_selection_method="magic")
    with pytest.raises(ValueError, match="decomposition_method"):
        LowRankGEMM(decomposition_method="qr")
    with pytest.raises(ValueError, match="a.shape"):
        LowRankGEMM()(torch.randn(3, 4), torch.randn(5, 6))
    if not torch.cuda.is_available():
        import layerzip

        with pytest.raises(layerzip.SpecError, match="fp8.*not available"):
            LowRankGEMM(target_rank=2, use_fp8=True)(torch.randn(3, 4), torch.randn(4, 4))
