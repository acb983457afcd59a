import pytest
import torch
from torch import nn

import layerzip
from layerzip.testing import SingleLayer, calibration_batches, decaying_weight


def _layer(out_f, in_f, seed=0):
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.copy_(decaying_weight(out_f, in_f, decay=0.97, seed=seed))
    return layer


def test_a_prime_size_is_padded_and_reported():
    model = SingleLayer(_layer(37, 64))
    ref = model.layer.weight.detach().clone()
    report = layerzip.compress(model, {"rules": [{"targets": ["layer"], "method": "ks_chain",
                                                  "params": {"rank": 4}}]}, progress=False)
    m = model.layer
    details = report.rows[0].details
    assert m.out_padded > 37 and details["padding"] == {"rows": m.out_padded - 37, "cols": 0}
    x = torch.randn(5, 64)
    torch.testing.assert_close(m(x), x @ m.dense_weight().t() + m.bias, rtol=1e-4, atol=1e-5)
    assert report.rows[0].weight_error < 1
    assert m.dense_weight().shape == ref.shape


def test_refine_on_calibration_inputs_lowers_the_output_error():
    batches = calibration_batches(32, batches=6, rows=128)  # one input distribution
    calib, hold = batches[:4], batches[4:]
    errs = {}
    for steps in (0, 400):
        model = SingleLayer(_layer(48, 32))
        params = {"rank": 2, "refine_steps": steps, "refine_inputs": "calibration",
                  "refine_lr": 3e-3}
        report = layerzip.compress(model, {"rules": [{"targets": ["layer"], "method": "ks_chain",
                                                      "params": params}]},
                                   calibration=calib, holdout=hold, progress=False)
        errs[steps] = report.rows[0].output_error
        if steps:
            first, last = report.rows[0].details["refine_loss"]
            assert last < first
    assert errs[400] < errs[0]


def test_calibration_refinement_without_data_is_a_clear_error():
    model = SingleLayer(_layer(48, 32))
    before = model.layer
    with pytest.raises(layerzip.LayerzipError, match="calibration"):
        layerzip.compress(model, {"rules": [{"targets": ["layer"], "method": "ks_chain",
                                             "params": {"refine_steps": 5,
                                                        "refine_inputs": "calibration"}}]},
                          progress=False)
    assert model.layer is before


def test_explicit_butterfly_patterns_on_a_square_layer():
    model = SingleLayer(_layer(16, 16))
    pats = [[1, 2, 2, 8], [2, 2, 2, 4], [4, 2, 2, 2], [8, 2, 2, 1]]
    report = layerzip.compress(model, {"rules": [{"targets": ["layer"], "method": "ks_chain",
                                                  "params": {"patterns": pats}}]},
                               progress=False)
    assert [p.as_list() for p in model.layer.patterns] == pats
    assert report.rows[0].params_after == 4 * 16 * 2 + 16
