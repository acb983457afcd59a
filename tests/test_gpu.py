"""The walker, calibration, save/load and low-rank backends on a CUDA model (skipped without a
GPU; benchmarks/device_run.sh runs these on the lent H100)."""

import pytest
import torch
from torch import nn

import layerzip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).cuda()


@pytest.mark.parametrize("backend", ["torch", "triton", "autotune", "splitk"])
def test_compress_calibrate_save_load_on_cuda(backend, tmp_path):
    m = model()
    x = torch.randn(32, 64, device="cuda")
    ref = m(x)
    report = layerzip.compress(m, {"rules": [{"targets": ["Linear"], "method": "svd",
                                              "params": {"fraction": 1.0, "whiten": True},
                                              "backend": backend}]},
                               calibration=[torch.randn(200, 64, device="cuda")],
                               holdout=[torch.randn(20, 64, device="cuda")], progress=False)
    assert all(r.weight_error < 1e-4 and r.output_error < 1e-3 for r in report.rows)
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    assert out.device.type == "cuda"
    layerzip.save(m, tmp_path)
    fresh = model()
    layerzip.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_bf16_model_keeps_dtype():
    m = model().bfloat16()
    layerzip.compress(m, {"rules": [{"targets": ["Linear"], "method": "rsvd",
                                     "params": {"rank": 16}}]}, progress=False)
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in m.parameters())
    assert m(torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_autotune_measures_eager_and_graph_choices_and_a_captured_step_replays():
    # bf16 decode rows: eager the host's time decides, in a graph the GPU's; a step captured
    # after the eager warm-up must run and be right whichever kernel serves it
    m = nn.Sequential(nn.Linear(512, 1024, bias=False)).cuda().bfloat16()
    layerzip.compress(m, {"rules": [{"targets": ["Linear"], "method": "rsvd",
                                     "params": {"rank": 64}, "backend": "autotune"}]},
                      progress=False)
    layer = m[0]
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
        tuner = layer._kernel
        static = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            m(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(static)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    assert tuner.name == "autotune"
    # the backend is the registry's one instance, shared with earlier tests: every shape it
    # measured has both choices, this one included
    assert set(tuner.graph_choices) == set(tuner.choices)
    mine = [k for k in tuner.choices if k[1] == torch.bfloat16 and k[2] == 16
            and k[4:6] == ((1024, 64), (512, 64))]
    assert len(mine) == 1
    print("eager choice", tuner.choices[mine[0]].name, "graph choice",
          tuner.graph_choices[mine[0]].name)
