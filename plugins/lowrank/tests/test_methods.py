import pytest
import torch
from torch import nn

import layerzip
from layerzip import FitContext, LayerStats
from layerzip.testing import SingleLayer, decaying_weight
from layerzip_lowrank import LowRankLinear, whitening_factor
from layerzip_lowrank.methods import AdaptiveParams, Rsvd, RsvdParams, Svd, SvdParams


def view_of(w, bias=None):
    return layerzip.DenseWeightView(w, bias)


def stats_of(x):
    x = x.double()
    return LayerStats(gram=x.t() @ x, count=x.shape[0])


def test_svd_is_eckart_young_optimal():
    w = decaying_weight(40, 30, decay=0.7)
    m = Svd().fit(view_of(w), SvdParams(rank=5), FitContext("l"))
    s = torch.linalg.svdvals(w.double())
    err = torch.linalg.matrix_norm(w.double() - m.dense_weight().double())
    torch.testing.assert_close(err, s[5:].square().sum().sqrt(), rtol=1e-5, atol=1e-6)
    assert m.fit_details["predicted_relative_error"] == pytest.approx(
        float(s[5:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-6)


def test_whitening_minimizes_output_error_and_matches_prediction():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    x = torch.randn(400, 32, generator=g) * torch.logspace(1, -2, 32)  # anisotropic inputs
    ctx = FitContext("l", stats=stats_of(x))
    plain = Svd().fit(view_of(w), SvdParams(rank=6), FitContext("l"))
    white = Svd().fit(view_of(w), SvdParams(rank=6, whiten=True), ctx)

    def out_err(m):
        diff = (w.double() - m.dense_weight().double()) @ x.double().t()
        return float(torch.linalg.matrix_norm(diff)
                     / torch.linalg.matrix_norm(w.double() @ x.double().t()))

    assert out_err(white) < 0.5 * out_err(plain)
    # dropping σᵢ of W·L costs exactly σᵢ in ‖(W − Ŵ) Xᵀ‖
    assert out_err(white) == pytest.approx(white.fit_details["predicted_relative_error"], rel=1e-6)
    assert white.fit_details["whiten_ridge"] == 0.0


def test_whitening_ridge_only_when_needed():
    x = torch.randn(10, 16, dtype=torch.float64)  # 10 rows: Gram of rank 10 < 16
    L, lam = whitening_factor(x.t() @ x)
    assert lam > 0 and torch.isfinite(L).all()
    L2, lam2 = whitening_factor(torch.eye(4, dtype=torch.float64))
    assert lam2 == 0.0 and torch.equal(L2, torch.eye(4, dtype=torch.float64))
    L3, lam3 = whitening_factor(4 * torch.eye(4, dtype=torch.float64), damping=0.25)
    assert lam3 == 1.0
    torch.testing.assert_close(L3, torch.eye(4, dtype=torch.float64) * 5 ** 0.5)


def test_damping_helps_when_calibration_rows_are_few():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    mix = torch.randn(64, 64, generator=g) / 8
    fit_x = torch.randn(40, 64, generator=g) @ mix  # fewer rows than inputs: Gram singular
    test_x = torch.randn(500, 64, generator=g) @ mix

    def held_out_error(damping):
        m = Svd().fit(view_of(w), SvdParams(rank=8, whiten=True, damping=damping),
                      FitContext("l", stats=stats_of(fit_x)))
        d = (w.double() - m.dense_weight().double()) @ test_x.double().t()
        return float(d.norm() / (w.double() @ test_x.double().t()).norm())

    assert held_out_error(0.01) < held_out_error(0.0)


def test_whiten_without_calibration_explains_how():
    model = SingleLayer(nn.Linear(8, 8))
    with pytest.raises(layerzip.SpecError, match="needs calibration data.*--calib"):
        layerzip.compress(model, {"rules": [{"targets": ["layer"], "method": "svd",
                                             "params": {"rank": 2, "whiten": True}}]})


def test_rsvd_within_hmt_bound_on_decaying_spectrum():
    # Halko–Martinsson–Tropp (Thm 10.6, p power iterations): E‖A − QQᵀA‖ ≤
    # [1 + 4√(k+p)/(p−1) · √min(m,n)]^{1/(2q+1)} σ_{k+1}; we check the Frobenius error of the
    # rank-k truncation against (1 + ε) times the optimum with that constant.
    w = decaying_weight(200, 150, decay=0.95, seed=3)
    k, p, q = 10, 10, 2
    m = Rsvd().fit(view_of(w), RsvdParams(rank=k, oversampling=p, power_iterations=q),
                   FitContext("l", seed=1))
    s = torch.linalg.svdvals(w.double())
    optimal = float(s[k:].square().sum().sqrt())
    err = float(torch.linalg.matrix_norm(w.double() - m.dense_weight().double()))
    factor = (1 + 4 * ((k + p) ** 0.5) / (p - 1) * (150 ** 0.5)) ** (1 / (2 * q + 1))
    assert optimal <= err <= factor * optimal
    assert err <= 1.05 * optimal, "with 2 power iterations rSVD is near-optimal here"


def test_rsvd_is_reproducible_and_leaves_global_rng_alone():
    w = decaying_weight(64, 48)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = Rsvd().fit(view_of(w), RsvdParams(rank=4), FitContext("x", seed=2)).dense_weight()
    assert torch.equal(torch.random.get_rng_state(), before)
    b = Rsvd().fit(view_of(w), RsvdParams(rank=4), FitContext("x", seed=2)).dense_weight()
    assert torch.equal(a, b)


def test_adaptive_picks_smallest_rank_meeting_tolerance():
    from layerzip_lowrank.methods import Adaptive

    w = decaying_weight(30, 30, decay=0.5)
    for tol in (0.3, 0.05, 0.001):
        m = Adaptive().fit(view_of(w), AdaptiveParams(error_tolerance=tol), FitContext("l"))
        err = float(torch.linalg.matrix_norm(w.double() - m.dense_weight().double())
                    / torch.linalg.matrix_norm(w.double()))
        assert err <= tol
        if m.rank > 1:
            smaller = Svd().fit(view_of(w), SvdParams(rank=m.rank - 1), FitContext("l"))
            e2 = float(torch.linalg.matrix_norm(w.double() - smaller.dense_weight().double())
                       / torch.linalg.matrix_norm(w.double()))
            assert e2 > tol


def test_module_trains():
    m = LowRankLinear(6, 5, 2)
    with torch.no_grad():
        m.u.normal_()
        m.v.normal_()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x, target = torch.randn(32, 5), torch.randn(32, 6)
    losses = []
    for _ in range(20):
        loss = (m(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_backends_reported():
    reg = layerzip.get_registry()
    names = {b.name: b.available() for b in reg.backends_for("lowrank_matmul")}
    assert names["torch"] == (True, "")
    if not torch.cuda.is_available():
        ok, why = names["fp8"]
        assert not ok and "CUDA" in why
    ok, why = names["tensorrt"]
    assert ok or "torch_tensorrt" in why or "CUDA" in why


def test_compile_backend_matches_reference():
    from layerzip_lowrank.backends import CompileBackend, lowrank_matmul_reference

    x, u, v, b = torch.randn(3, 7, 16), torch.randn(12, 4), torch.randn(16, 4), torch.randn(12)
    torch.testing.assert_close(CompileBackend()(x, u, v, b), lowrank_matmul_reference(x, u, v, b),
                               rtol=1e-5, atol=1e-5)


def test_saved_with_unavailable_backend_loads_with_auto(monkeypatch):
    from layerzip_lowrank.backends import FP8Backend

    monkeypatch.setattr(FP8Backend, "available", lambda self: (False, "no GPU here"))
    cfg = {"out_features": 4, "in_features": 3, "rank": 2, "bias": True, "backend": "fp8"}
    m = LowRankLinear.from_config(cfg)
    assert m.backend_name != "fp8"


@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs CUDA cc ≥ 8.9")
def test_fp8_backend_close_to_reference_on_gpu():
    from layerzip_lowrank.backends import FP8Backend, lowrank_matmul_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g).cuda().bfloat16()
    u = (torch.randn(384, 64, generator=g) / 8).cuda().bfloat16()
    v = (torch.randn(512, 64, generator=g) / 22).cuda().bfloat16()
    b = torch.randn(384, generator=g).cuda().bfloat16()
    ref = lowrank_matmul_reference(x.double(), u.double(), v.double(), b.double())
    with torch.no_grad():
        out = FP8Backend()(x, u, v, b)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < 0.08, rel  # e4m3 has a 3-bit mantissa: a few percent is its honest cost


def test_splitk_backend_matches_reference():
    from layerzip_lowrank.backends import SplitKBackend, lowrank_matmul_reference

    be = SplitKBackend()
    assert be.splits(4096) == 32 and be.splits(96) == 1 and be.splits(256) == 4
    x, u, v, b = torch.randn(2, 3, 512), torch.randn(40, 8), torch.randn(512, 8), torch.randn(40)
    assert be.supports(x) and not be.supports(torch.randn(100, 512))
    torch.testing.assert_close(be(x, u, v, b), lowrank_matmul_reference(x, u, v, b),
                               rtol=1e-4, atol=1e-4)
    vt = torch.randn(8, 512).t()  # non-contiguous: falls back, same function
    torch.testing.assert_close(be(x, u, vt, b), lowrank_matmul_reference(x, u, vt, b))
