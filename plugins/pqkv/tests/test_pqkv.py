import pytest
import torch
from torch import nn

import layerzip
from layerzip.testing import SingleLayer, calibration_batches, decaying_weight
from layerzip_pqkv import ApproxKVLinear, KVLinearConfig


def layer(out_f=96, in_f=64, rank=None, seed=0):
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        w = decaying_weight(out_f, in_f, decay=0.95, seed=seed)
        if rank is not None:  # exactly rank-r
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            w = (u[:, :rank] * s[:rank]) @ vh[:rank]
        lin.weight.copy_(w)
    return lin


def inputs(in_f=64, batches=10, rows=128):
    b = calibration_batches(in_f, batches=batches, rows=rows)  # one input distribution
    return torch.cat(b[: batches // 2]), torch.cat(b[batches // 2:])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_whitened_search_preserves_inner_products_exactly():
    """No quantization (Ks = number of signed keys: every key its own centroid) and all keys
    retrieved: the output equals the truncated SVD's. The published K L⁻ᵀ variant does not."""
    lin = layer(rank=8)
    calib, held = inputs()
    m = ApproxKVLinear.from_linear(lin, {"expected_K": 8, "nbits_keys": 4, "energy_keep": 1.0,
                                         "approx_inference": False})
    m.prepare(calib)
    assert m.layout["rank"] == 8 and m.layout["ks_keys"] == 16 and m.whiten_l.numel()
    with torch.no_grad():
        coef = m.selection(held)                  # approximate (PQ) scores of the 8 keys
        out = coef @ m.value_weight.t() + m.bias
        ref = lin(held)                           # W has rank 8: truncated SVD = W
        assert rel(out, ref) < 1e-5
        assert rel(coef, held @ m.key_weight.t()) < 1e-5
        # the bug this replaces: keys K L⁻ᵀ against queries L⁻¹x change every score
        chol = m.whiten_l.double()
        wrong_keys = m.key_weight.double() @ torch.linalg.inv(chol).t()
        wrong = m.whiten_query(held.double()) @ wrong_keys.t()
        assert rel(wrong, held.double() @ m.key_weight.double().t()) > 0.5


def test_topk_returns_exactly_k_distinct_keys():
    lin = layer()
    calib, held = inputs()
    for backend in ("torch", "faiss", "nanopq"):
        m = ApproxKVLinear.from_linear(lin, {"expected_K": 12, "backend": backend})
        m.prepare(calib)
        ids, scores, valid = m.lookup(held)
        assert ids.shape == (held.shape[0], 12) and bool(valid.all())
        assert all(len(set(row.tolist())) == 12 for row in ids)
        assert bool((scores[:, :-1] >= scores[:, 1:] - 1e-6).all())


@pytest.mark.parametrize("backend", ["torch", "faiss", "nanopq"])
def test_range_threshold_is_calibrated_and_holds_out_of_sample(backend):
    lin = layer()
    calib, held = inputs()
    m = ApproxKVLinear.from_linear(lin, {"retrieval": "range", "expected_K": 10,
                                         "backend": backend})
    m.prepare(calib)
    assert float(m.threshold) > 0
    for x, tol in ((calib, 0.02), (held, 0.2)):
        _, _, valid = m.lookup(x)
        mean_k = float(valid.sum(1).float().mean())
        assert abs(mean_k - 10) <= 10 * tol, f"{backend}: {mean_k} keys on average"


@pytest.mark.parametrize("backend, ivf", [("faiss", False), ("faiss", True), ("nanopq", False)])
def test_backends_agree_with_the_torch_reference_on_the_same_codes(backend, ivf):
    # (nanopq has no IVF: the config rejects it, see test_invalid_configs)
    lin = layer()
    calib, held = inputs()
    cfg = {"expected_K": 8, "backend": "torch"}
    if ivf:
        cfg.update(nlist=8, nprobe=3)
    m = ApproxKVLinear.from_linear(lin, cfg)
    m.prepare(calib)
    q, index = m.whiten_query(held), m.index()
    ref_be = layerzip.get_backend("kv_lookup", "torch")
    be = layerzip.get_backend("kv_lookup", backend)
    tau = float(ref_be(q, index, k=8)[1][:, -1].median())
    full = torch.topk(ref_be(q, index, k=index.codes.shape[0])[1], 1).values  # sanity
    assert full.shape[0] == q.shape[0]
    for kw in ({"k": 8}, {"threshold": tau}):
        ids0, s0, v0 = ref_be(q, index, **kw)
        ids1, s1, v1 = be(q, index, **kw)
        for i in range(q.shape[0]):
            a = {int(j): float(s) for j, s, ok in zip(ids0[i], s0[i], v0[i]) if ok}
            b = {int(j): float(s) for j, s, ok in zip(ids1[i], s1[i], v1[i]) if ok}
            # float32 rounding differs between the engines: a key may only differ when its
            # score sits on the boundary (the k-th score, or the threshold)
            edge = tau if "threshold" in kw else min(a.values())
            for j in set(a) ^ set(b):
                assert abs(a.get(j, b.get(j)) - edge) < 1e-4, f"row {i} key {j} ({kw})"
            for j in set(a) & set(b):
                assert a[j] == pytest.approx(b[j], rel=1e-4, abs=1e-5)


def test_more_keys_lower_the_error_and_refine_helps():
    lin = layer()
    calib, held = inputs()
    ref = lin(held).detach()
    errs = []
    for k in (4, 16, 40):
        m = ApproxKVLinear.from_linear(lin, {"expected_K": k, "energy_keep": 0.999,
                                             "nbits_keys": 4})
        m.prepare(calib)
        with torch.no_grad():
            errs.append(rel(m(held), ref))
    assert errs[0] > errs[1] > errs[2]
    m = ApproxKVLinear.from_linear(lin, {"expected_K": 16, "energy_keep": 0.999,
                                         "nbits_keys": 4, "refine_exact_with_float_keys": True})
    m.prepare(calib)
    with torch.no_grad():
        assert rel(m(held), ref) < errs[1]


def test_ste_training_lowers_the_loss_and_reaches_the_float_factors():
    torch.manual_seed(0)
    lin = layer()
    calib, held = inputs()
    target = layer(seed=3)  # learn towards another layer's outputs
    m = ApproxKVLinear.from_linear(lin, {"expected_K": 16, "use_ste": True})
    m.prepare(calib)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(60):
        x = calib[torch.randint(0, calib.shape[0], (128,))]
        loss = (m(x) - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        assert m.key_weight.grad is not None and m.value_weight.grad is not None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    m.requantize()  # codes follow the trained floats
    m.eval()
    with torch.no_grad():
        assert rel(m(held), target(held)) < rel(lin(held), target(held))


def test_exact_path_in_eval_when_approx_inference_is_off():
    lin = layer(rank=8)
    calib, held = inputs()
    m = ApproxKVLinear.from_linear(lin, {"expected_K": 2, "approx_inference": False})
    m.prepare(calib)
    with torch.no_grad():
        assert rel(m(held), lin(held)) < 1e-4


def test_invalid_configs_get_clear_errors_before_any_work():
    lin = layer()
    calib, _ = inputs()
    cases = [
        ({"m_pq_keys": 5}, "m_pq_keys 5 must divide in_features 64"),
        ({"nbits_keys": 8, "energy_keep": 0.3, "expected_K": 2}, "only"),
        ({"nlist": 500}, "IVF nlist 500 needs at least 500 keys"),
        ({"expected_K": 200}, "expected_K 200 exceeds"),
    ]
    for cfg, words in cases:
        m = ApproxKVLinear.from_linear(lin, cfg)
        with pytest.raises(ValueError, match=words):
            m.prepare(calib)
        assert not m.prepared and m.weight.shape == (96, 64)  # untouched
    for cfg, words in [({"npq_M_keys": 4}, "nanopq options"),
                       ({"backend": "nanopq", "nbits_keys": 4}, "faiss/torch options"),
                       ({"nprobe": 2}, "nprobe needs an IVF"),
                       ({"nlist": 4, "nprobe": 8}, "exceeds nlist"),
                       ({"backend": "nanopq", "nlist": 4}, "faiss/torch options"),
                       ({"use_gpu": True, "backend": "faiss"}, "no GPU support"),
                       ({"use_gpu": True}, "applies to backend 'faiss'"),
                       ({"values_index_type": "SQ", "nbits_vals": 4}, "values_index_type is 'SQ'"),
                       ({"values_index_type": "PQ", "sq_type": "QT_4bit"}, "is 'PQ'")]:
        with pytest.raises(ValueError, match=words):
            KVLinearConfig(**cfg)
    m = ApproxKVLinear.from_linear(lin, {"whiten": True})
    with pytest.raises(ValueError, match="need calibration inputs"):
        m.prepare(None)
    # through a spec: the rule is named, the model is left as it was
    model = SingleLayer(layer())
    with pytest.raises(layerzip.SpecError, match="rule 0"):
        layerzip.plan(model, {"rules": [{"targets": ["layer"], "method": "pq_kv",
                                         "params": {"m_pq_keys": 7}}]})


def test_storage_is_counted_and_smaller_than_dense_without_whitening():
    lin = layer(out_f=384, in_f=256)
    calib, _ = inputs(in_f=256)
    m = ApproxKVLinear.from_linear(lin, {"whiten": False, "energy_keep": 0.9, "expected_K": 8})
    m.prepare(calib)
    parts = m.stored_bytes()
    assert set(parts) >= {"key_codes", "key_codebooks", "val_codes", "val_vmin", "bias"}
    assert "key_weight" not in parts and "weight" not in parts
    assert sum(parts.values()) < 384 * 256 * 4
    big = ApproxKVLinear.from_linear(lin, {"whiten": True, "energy_keep": 0.9, "expected_K": 8})
    big.prepare(calib)
    assert big.stored_bytes()["whiten_l"] == 256 * 256 * 4  # whitening is paid for, and shown


def test_save_and_load_round_trip_through_a_spec(tmp_path):
    model = SingleLayer(layer())
    calib, held = inputs()
    layerzip.compress(model, {"rules": [{"targets": ["layer"], "method": "pq_kv",
                                         "params": {"retrieval": "range", "expected_K": 8,
                                                    "values_index_type": "PQ"}}]},
                      calibration=[calib], progress=False)
    with torch.no_grad():
        before = model(held)
    layerzip.save(model, tmp_path)
    fresh = SingleLayer(layer())
    layerzip.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(held), before)
    assert float(fresh.layer.threshold) == float(model.layer.threshold) > 0


@pytest.mark.parametrize("cfg", [{"whiten": False, "expected_K": 8},
                                 {"expected_K": 8, "refine_exact_with_float_keys": True},
                                 {"expected_K": 8, "values_index_type": "PQ"}])
def test_plan_estimate_bounds_what_is_stored(cfg):
    from layerzip import DenseWeightView

    lin = layer(out_f=384, in_f=256)
    calib, _ = inputs(in_f=256)
    est = layerzip.get_approximator("pq_kv").estimate(
        DenseWeightView(lin.weight, lin.bias), KVLinearConfig(**cfg))
    m = ApproxKVLinear.from_linear(lin, cfg)
    m.prepare(calib)
    assert sum(m.stored_bytes().values()) <= est.params * 4
