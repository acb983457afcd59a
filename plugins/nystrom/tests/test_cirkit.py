"""Nyström sum layers in cirkit squared circuits (needs libcirkit)."""

import pytest
import torch

cirkit = pytest.importorskip("cirkit", reason="libcirkit is not installed (pip install libcirkit)")

import cirkit.symbolic.functional as SF  # noqa: E402
from cirkit.backend.torch import compiler as torch_compiler  # noqa: E402
from cirkit.pipeline import PipelineContext  # noqa: E402
from cirkit.symbolic.layers import SumLayer  # noqa: E402
from cirkit.templates import data_modalities, utils  # noqa: E402

from layerzip_nystrom.cirkit_layers import (  # noqa: E402
    NystromSumLayer,
    SymbolicCircuitLayers,
    nystrom_sum_layers,
)

K = 3  # units per sum layer: the squared layers are K² × K² = 9 × 9


@pytest.fixture(scope="module")
def circuits():
    sc = data_modalities.image_data(
        (1, 4, 4), region_graph="quad-tree-4", input_layer="embedding", num_input_units=K,
        sum_product_layer="cp", num_sum_units=K,
        sum_weight_param=utils.Parameterization(activation="none", initialization="normal"))
    sq = SF.multiply(sc, sc)
    return sq, SF.integrate(sq)


def compile_both(sq, z):
    torch.manual_seed(123)  # same parameters in every compilation (cirkit's order is fixed)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True, optimize=True)
    return ctx.compile(sq), ctx.compile(z)


def log_probs(sq, z, x):
    c, cz = compile_both(sq, z)
    with torch.no_grad():
        return c(x).real.flatten().double(), cz().real.flatten().double()


@pytest.fixture(scope="module")
def exact(circuits):
    sq, z = circuits
    x = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    logp, logz = log_probs(sq, z, x)
    return x, logp, logz


@pytest.mark.parametrize("pivots", ["uniform", "l2", "leverage"])
def test_full_rank_reproduces_log_z_and_log_p(circuits, exact, pivots):
    sq, z = circuits
    x, logp, logz = exact
    with nystrom_sum_layers(K * K, pivots) as counts:
        got_p, got_z = log_probs(sq, z, x)
    assert counts["replaced"] > 0
    torch.testing.assert_close(got_z, logz, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_p, logp, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("pivots", ["uniform", "l2", "leverage"])
def test_error_falls_as_rank_grows(circuits, exact, pivots):
    sq, z = circuits
    x, logp, logz = exact
    errs = []
    for rank in (2, 5, 8, 9):
        with nystrom_sum_layers(rank, pivots):
            got_p, got_z = log_probs(sq, z, x)
        # log p(x) − log Z of the squared circuit: the normalized log-likelihood
        errs.append(float(((got_p - got_z) - (logp - logz)).abs().mean()))
    assert errs[-1] < 1e-3
    assert errs[0] > errs[-2] > errs[-1], f"{pivots}: {errs}"


def test_the_compile_rule_is_restored_even_after_an_error(circuits):
    sq, z = circuits
    before = dict(torch_compiler.DEFAULT_LAYER_COMPILATION_RULES)
    with pytest.raises(RuntimeError, match="boom"):
        with nystrom_sum_layers(4, "l2"):
            assert torch_compiler.DEFAULT_LAYER_COMPILATION_RULES[SumLayer] is not before[SumLayer]
            raise RuntimeError("boom")
    assert torch_compiler.DEFAULT_LAYER_COMPILATION_RULES == before
    c, _ = compile_both(sq, z)
    assert not any(isinstance(m, NystromSumLayer) for m in c.modules())


def test_layers_are_folded_and_trainable(circuits):
    sq, z = circuits
    with nystrom_sum_layers(4, "leverage"):
        c, cz = compile_both(sq, z)
    layers = [m for m in c.modules() if isinstance(m, NystromSumLayer)]
    assert layers and max(m.num_folds for m in layers) > 1  # folded like the exact layers
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    (c(x).real - cz().real).mean().backward()
    grads = [p.grad for m in layers for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # s is capped at min(K_o², K_i²): the root layer has one output unit
    assert all(m.rows.shape == (m.num_folds, m.rank) for m in layers)
    assert {m.rank for m in layers} == {1, 4}


def test_unknown_pivot_strategy_is_a_clear_error(circuits):
    import layerzip

    sq, z = circuits
    with pytest.raises(layerzip.LayerzipError, match="pivot"):
        with nystrom_sum_layers(4, "levrage"):
            compile_both(sq, z)


@pytest.mark.parametrize("pivots", ["l2", "leverage"])
def test_optimal_middle_is_exact_at_full_rank_and_never_worse_per_layer(circuits, exact, pivots):
    sq, z = circuits
    x, logp, logz = exact
    with nystrom_sum_layers(K * K, pivots, middle="optimal"):
        got_p, got_z = log_probs(sq, z, x)
    torch.testing.assert_close(got_z, logz, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_p, logp, rtol=1e-4, atol=1e-3)

    def layer_errors(middle):
        with nystrom_sum_layers(3, pivots, middle=middle):
            c, _ = compile_both(sq, z)
        errs = []
        with torch.no_grad():
            c(x)  # chooses the pivots (same seed → same pivots for both middles)
            for m in c.modules():
                if isinstance(m, NystromSumLayer) and m.rank > 1:
                    approx = torch.bmm(*m.factors()).double()
                    a, b = m.a().double(), m.b().double()
                    full = torch.stack([torch.kron(a[f], b[f]) for f in range(a.shape[0])])
                    errs.append(((approx - full).norm(dim=(1, 2)) / full.norm(dim=(1, 2))))
        return torch.cat(errs)

    inter, opt = layer_errors("intersection"), layer_errors("optimal")
    # C⁺ M R⁺ minimizes ‖M − C U R‖ over U for the same pivots: never worse, fold by fold
    assert bool((opt <= inter + 1e-9).all()) and float(opt.mean()) < float(inter.mean())


def test_a_spec_drives_the_circuit_compilation(circuits, exact):
    import layerzip
    from layerzip_nystrom.cirkit_layers import compile_circuit

    sq, z = circuits
    x, logp, logz = exact
    root = [name for name, layer in SymbolicCircuitLayers(sq).named_modules()
            if name.startswith("sum.") and layer.num_output_units == 1]
    assert len(root) == 1  # the one-output root: rank K² would not fit it
    spec = {"rules": [{"targets": ["SumLayer"], "ignore": root, "method": "nystrom",
                       "params": {"rank": K * K, "pivots": "l2", "middle": "optimal"}}]}
    torch.manual_seed(123)
    (c, cz), counts, plan = compile_circuit(sq, spec, others=(z,))
    assert counts["replaced"] == 2 * len(plan.layers)  # the circuit and its integral
    with torch.no_grad():
        torch.testing.assert_close(c(x).real.flatten().double(), logp, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(cz().real.flatten().double(), logz, rtol=1e-4, atol=1e-4)
    bad = [
        ({"targets": ["layer.3"]}, "matches no layer"),
        ({"ignore": []}, f"layer '{root[0]}'.*rank 9 exceeds"),
        ({"method": "svd", "params": {"rank": 4}}, "field 'method'"),
        ({"params": {"rank": 4, "selection": "top"}}, "sample pivots"),
        ({"params": {"rank": 4, "pivot": "l2"}}, "rule 0, params"),
    ]
    for change, words in bad:
        rule = {**spec["rules"][0], **change}
        with pytest.raises(layerzip.SpecError, match=words):
            compile_circuit(sq, {"rules": [rule]})
    plain = data_modalities.image_data(
        (1, 4, 4), region_graph="quad-tree-4", input_layer="embedding", num_input_units=K,
        sum_product_layer="cp", num_sum_units=K, sum_weight_param=utils.Parameterization(
            activation="none", initialization="normal"))
    with pytest.raises(layerzip.SpecError, match="matches no layer"):
        compile_circuit(plain, spec)  # not squared: no Kronecker sum layers


def test_inference_reuses_the_factors_until_the_weights_change(circuits):
    sq, z = circuits
    with nystrom_sum_layers(4, "l2"):
        c, _ = compile_both(sq, z)
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    layer = next(m for m in c.modules() if isinstance(m, NystromSumLayer) and m.rank == 4)
    with torch.no_grad():
        first = c(x)
        cached = layer._inference_cache[1][0]
        assert torch.equal(c(x), first) and layer._inference_cache[1][0] is cached
        for p in layer.parameters():
            p.mul_(1.5)  # a training step would do this: the cache must notice
        changed = c(x)
    assert layer._inference_cache[1][0] is not cached and not torch.equal(changed, first)
