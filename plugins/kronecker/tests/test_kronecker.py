import pytest
import torch

import layerzip
from layerzip import DenseWeightView, FitContext, LayerStats, SpecError
from layerzip.testing import SingleLayer
from layerzip_kronecker import KroneckerParams, kron_sum, rearrange
from layerzip_kronecker.method import Kronecker


def fit(w, ctx=None, **params):
    return Kronecker().fit(DenseWeightView(w), KroneckerParams(**params), ctx or FitContext("l"))


def random_kron(r, m1, n1, m2, n2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, m1, n1, generator=g, dtype=torch.float64),
            torch.randn(r, m2, n2, generator=g, dtype=torch.float64))


def test_rearrangement_turns_kronecker_into_rank_one():
    a, b = random_kron(1, 3, 4, 5, 2)
    w = kron_sum(a, b)
    torch.testing.assert_close(w, torch.kron(a[0], b[0]))
    r = rearrange(w, 3, 4, 5, 2)
    torch.testing.assert_close(r, a[0].reshape(-1, 1) @ b[0].reshape(1, -1))


@pytest.mark.parametrize("r", [1, 2, 3])
def test_exact_recovery_of_sums_of_kronecker_products(r):
    a, b = random_kron(r, 4, 3, 5, 6, seed=r)
    w = kron_sum(a, b).float()
    m = fit(w, factors=[[4, 3], [5, 6]], rank=r)
    assert m.fit_details["relative_error"] < 1e-6
    torch.testing.assert_close(m.dense_weight(), w, rtol=1e-5, atol=1e-5)
    x = torch.randn(7, 18)
    torch.testing.assert_close(m(x), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_recovery_with_noise_and_predicted_error_equals_measured():
    a, b = random_kron(2, 4, 3, 5, 6)
    clean = kron_sum(a, b)
    noise = 1e-3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(9),
                               dtype=torch.float64)
    w = (clean + noise).float()
    for r in (1, 2, 3, 6):
        m = fit(w, factors=[[4, 3], [5, 6]], rank=r)
        d = m.fit_details
        measured = float(torch.linalg.matrix_norm(w.double() - m.dense_weight().double())
                         / torch.linalg.matrix_norm(w.double()))
        assert d["predicted_relative_error"] == pytest.approx(measured, rel=1e-4, abs=1e-7)
        assert d["alpha"] == pytest.approx(1.0, abs=1e-9), "lsq scale is 1 after an exact SVD"
    assert fit(w, factors=[[4, 3], [5, 6]], rank=2).fit_details["relative_error"] < 2e-3


def test_norm_alpha_never_beats_lsq():
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    lsq = fit(w, factors=[[4, 3], [5, 4]], rank=1, alpha="lsq").fit_details["relative_error"]
    norm = fit(w, factors=[[4, 3], [5, 4]], rank=1, alpha="norm").fit_details["relative_error"]
    none = fit(w, factors=[[4, 3], [5, 4]], rank=1, alpha="none").fit_details["relative_error"]
    assert norm >= lsq - 1e-9 and none == pytest.approx(lsq, abs=1e-9)


def test_residual_never_increases_error_and_respects_budget():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    base = fit(w, factors=[[4, 4], [6, 4]], rank=2)
    errs = [base.fit_details["relative_error"]]
    for frac in (0.01, 0.05, 0.2):
        m = fit(w, factors=[[4, 4], [6, 4]], rank=2, residual_fraction=frac)
        assert m.res_idx.numel() == int(frac * w.numel())
        errs.append(m.fit_details["relative_error"])
        assert m.fit_details["kronecker_relative_error"] == pytest.approx(errs[0], rel=1e-9)
    assert all(e1 <= e0 + 1e-12 for e0, e1 in zip(errs, errs[1:]))
    # residual_params counts the int32 index: one float32 entry costs 2 parameter units
    m = fit(w, factors=[[4, 4], [6, 4]], rank=2, residual_params=101)
    assert m.res_idx.numel() == 50 and m.res_idx.dtype == torch.int32
    stored = sum(t.numel() * t.element_size() for t in (m.res_idx, m.res_val))
    assert stored <= 101 * 4


def test_activation_scored_residual_needs_and_uses_calibration():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="needs calibration"):
        fit(w, factors=[[4, 4], [6, 4]], rank=1, residual_fraction=0.1,
            residual_score="activation")
    x = torch.randn(200, 16, dtype=torch.float64) * torch.logspace(1, -2, 16, dtype=torch.float64)
    ctx = FitContext("l", stats=LayerStats(gram=x.t() @ x, count=200))
    mag = fit(w, ctx, factors=[[4, 4], [6, 4]], rank=1, residual_fraction=0.1)
    act = fit(w, ctx, factors=[[4, 4], [6, 4]], rank=1, residual_fraction=0.1,
              residual_score="activation")

    def out_err(m):
        d = (w.double() - m.dense_weight().double()) @ x.t()
        return float(d.norm() / (w.double() @ x.t()).norm())

    assert out_err(act) < out_err(mag)


def test_auto_finds_the_exact_shape_from_singular_values():
    a, b = random_kron(1, 4, 6, 8, 8)
    w = kron_sum(a, b).float()  # 32×48
    m = fit(w, factors="auto", rank=1)
    assert m.factors == [[4, 6], [8, 8]] and m.fit_details["relative_error"] < 1e-6


def test_malformed_factors_name_the_divisors():
    model = SingleLayer(torch.nn.Linear(12, 10))
    with pytest.raises(SpecError) as info:
        layerzip.plan(model, {"rules": [{"targets": ["layer"], "method": "kronecker",
                                         "params": {"factors": [[3, 4], [3, 3]]}}]})
    msg = str(info.value)
    assert "rule 0" in msg and "divisors of 10: [1, 2, 5, 10]" in msg
    assert "n1·n2 = 4·3" not in msg and "m1·m2 = 3·3 ≠ out_features 10" in msg


def test_conv1d_full_rank_reproduces_dense_outputs():
    from layerzip.models import gpt2_tiny

    model = gpt2_tiny()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    # c_fc: 64 → 256 (W is 256×64) = (16·16)×(8·8): R(W) is (16·8)×(16·8), full rank 128
    report = layerzip.compress(model, {"rules": [
        {"targets": ["re:transformer\\.h\\.\\d+\\.mlp\\.c_fc"], "method": "kronecker",
         "params": {"factors": [[16, 8], [16, 8]], "rank": 128}},
        {"targets": ["re:transformer\\.h\\.\\d+\\.mlp\\.c_proj"], "method": "kronecker",
         "params": {"factors": [[8, 16], [8, 16]], "rank": 128}}]}, progress=False)
    assert len(report.rows) == 4 and max(r.weight_error for r in report.rows) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_forward_matches_dense_weight_and_trains():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(4))
    m = fit(w, factors=[[4, 4], [6, 4]], rank=2, residual_fraction=0.05)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(m(x), x @ m.dense_weight().t() + m.bias if m.bias is not None
                               else x @ m.dense_weight().t(), rtol=1e-4, atol=1e-5)
    m(x).square().sum().backward()
    assert m.a.grad is not None and m.b.grad is not None and m.res_val.grad is not None


def test_half_precision_residual():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    m = fit(w, factors=[[4, 4], [6, 4]], rank=1, residual_fraction=0.1).to(torch.bfloat16)
    x = torch.randn(5, 16).bfloat16()
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ m.dense_weight().double().t()  # the view had no bias
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-2


def test_residual_gradients_equal_the_dense_layers():
    from layerzip_kronecker.module import kron_matmul_reference

    g = torch.Generator().manual_seed(9)
    m1, n1, m2, n2 = 3, 4, 5, 2
    m, n = m1 * m2, n1 * n2
    idx = torch.randperm(m * n, generator=g)[:17].sort().values.to(torch.int32)
    a, b = (torch.randn(1, m1, n1, generator=g, dtype=torch.float64),
            torch.randn(1, m2, n2, generator=g, dtype=torch.float64))
    val = torch.randn(17, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, n, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, m, generator=g, dtype=torch.float64)
    gx, gv = torch.autograd.grad(kron_matmul_reference(x, a, b, idx, val, None), (x, val), dy)
    w = kron_sum(a, b).clone()
    w.view(-1).index_put_((idx.long(),), val, accumulate=True)   # the dense layer
    x2, v2 = x.detach().requires_grad_(True), val
    wx, wv = torch.autograd.grad(x2 @ w.t(), (x2, v2), dy)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gv, wv)


def test_block_residual_keeps_whole_blocks_by_energy_within_budget():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(12))
    (m1, n1), (m2, n2) = (4, 4), (6, 4)
    base = fit(w, factors=[[m1, n1], [m2, n2]], rank=1)
    m = fit(w, factors=[[m1, n1], [m2, n2]], rank=1, residual_fraction=0.2,
            residual_structure="blocks")
    nb = int(0.2 * w.numel() / (m2 * n2))
    assert m.res_idx.shape == (nb,) and m.res_val.shape == (nb, m2, n2)
    assert m.fit_details["residual_nnz"] == nb * m2 * n2
    # the kept blocks are exactly the residual there, and the highest-energy ones
    resid = w.double() - kron_sum(m.a.detach().double(), m.b.detach().double())
    energy = rearrange(resid.square(), m1, n1, m2, n2).sum(1)
    assert set(m.res_idx.tolist()) == set(torch.topk(energy, nb).indices.tolist())
    err = w.double() - m.dense_weight().double()
    kept = rearrange(err, m1, n1, m2, n2)[m.res_idx.long()]
    assert float(kept.abs().max()) < 1e-6, "a kept block leaves no error"
    assert m.fit_details["relative_error"] < base.fit_details["relative_error"]
    assert m.fit_details["relative_error"] == pytest.approx(
        float(err.norm() / w.double().norm()), rel=1e-5)
    # residual_params: each block costs m2·n2 values + one int32 index (float32: 1 unit)
    m = fit(w, factors=[[m1, n1], [m2, n2]], rank=1, residual_params=2 * (m2 * n2 + 1) + 3,
            residual_structure="blocks")
    assert m.res_idx.numel() == 2


def test_column_residual_keeps_whole_input_columns_by_score_within_budget():
    # outlier input features: the residual's columns with the most (score-weighted) energy
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(14))
    w[:, [3, 11]] *= 6  # two outlier input columns
    factors = [[4, 4], [6, 4]]
    base = fit(w, factors=factors, rank=1)
    m = fit(w, factors=factors, rank=1, residual_fraction=0.2, residual_structure="columns")
    k = int(0.2 * w.numel() / 24)  # whole columns of 24 values
    assert m.res_idx.shape == (k,) and m.res_val.shape == (24, k)
    assert m.fit_details["residual_nnz"] == k * 24
    resid = w.double() - kron_sum(m.a.detach().double(), m.b.detach().double())
    assert m.res_idx.tolist() == sorted(torch.topk(resid.square().sum(0), k).indices.tolist())
    assert {3, 11} <= set(m.res_idx.tolist())
    err = w.double() - m.dense_weight().double()
    assert float(err[:, m.res_idx.long()].abs().max()) < 1e-6, "a kept column leaves no error"
    assert m.fit_details["relative_error"] < base.fit_details["relative_error"]
    assert m.fit_details["relative_error"] == pytest.approx(
        float(err.norm() / w.double().norm()), rel=1e-5)
    # residual_params: each column costs 24 values + one int32 index (float32: 1 unit)
    m = fit(w, factors=factors, rank=1, residual_params=2 * 25 + 3, residual_structure="columns")
    assert m.res_idx.numel() == 2


def test_column_residual_by_activation_prefers_features_with_large_inputs():
    # same residual energy in every column; calibration inputs make feature 5 the loudest
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(15))
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(16))
    x[:, 5] *= 30
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    layerzip.compress(model, {"rules": [{"targets": ["0"], "method": "kronecker", "params": {
        "factors": [[4, 4], [6, 4]], "rank": 1, "residual_params": 25,
        "residual_structure": "columns", "residual_score": "activation"}}]},
        calibration=[x], progress=False)
    assert model[0].res_idx.tolist() == [5]


def test_block_and_entry_residuals_agree_with_the_dense_layer_forward_and_backward():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(13))
    for structure in ("entries", "blocks", "columns"):
        m = fit(w, factors=[[4, 4], [6, 4]], rank=2, residual_fraction=0.25,
                residual_structure=structure)
        x = torch.randn(3, 5, 16, requires_grad=True)
        dense = m.dense_weight()
        torch.testing.assert_close(m(x), x @ dense.t(), rtol=1e-4, atol=1e-5)
        dy = torch.randn(3, 5, 24)
        gx, gv = torch.autograd.grad(m(x), (x, m.res_val), dy)
        torch.testing.assert_close(gx, dy @ dense, rtol=1e-4, atol=1e-5)
        # dS from the dense layer's gradient at the kept positions
        dw = torch.einsum("...i,...j->ij", dy, x.detach())
        if structure == "blocks":
            want = rearrange(dw, 4, 4, 6, 4)[m.res_idx.long()].reshape(gv.shape)
        elif structure == "columns":
            want = dw[:, m.res_idx.long()]
        else:
            want = dw.reshape(-1)[m.res_idx.long()]
        torch.testing.assert_close(gv, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structure,dim", [("blocks", 3), ("columns", 2)])
def test_structured_residual_round_trips_through_save_and_load(tmp_path, structure, dim):
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    spec = {"rules": [{"targets": ["0"], "method": "kronecker",
                       "params": {"factors": [[4, 4], [6, 4]], "rank": 1,
                                  "residual_fraction": 0.25, "residual_structure": structure}}]}
    layerzip.compress(model, spec)
    x = torch.randn(4, 16)
    ref = model(x)
    layerzip.save(model, tmp_path / "ck")
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 24))
    layerzip.load(fresh, tmp_path / "ck")
    assert fresh[0].residual_structure == structure and fresh[0].res_val.dim() == dim
    torch.testing.assert_close(fresh(x), ref)


@pytest.mark.parametrize("structure", ["entries", "blocks", "columns"])
def test_estimate_counts_what_is_stored_and_ratio_budgets_hold(structure):
    """The plan-time estimate of a residual (values + int32 indices, one per entry or per
    block) matches what the fitted module stores, in bytes; with `ratio` the whole layer
    stays within its budget."""
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(21))
    view = DenseWeightView(w)
    for params in ({"factors": [[6, 4], [8, 8]], "rank": 2, "residual_fraction": 0.25},
                   {"factors": [[6, 4], [8, 8]], "ratio": 0.6, "residual_params": 300}):
        p = KroneckerParams(**params, residual_structure=structure)
        est = Kronecker().estimate(view, p)
        m = Kronecker().fit(view, p, FitContext("l"))
        stored = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        assert est.params * 4 == stored  # float32 units: a value or an int32 index is 4 bytes
        if "ratio" in params:
            assert stored <= (1 - params["ratio"]) * w.numel() * 4
