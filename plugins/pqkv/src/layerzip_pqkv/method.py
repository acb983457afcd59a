"""The `pq_kv` method: a layer → ApproxKVLinear through a spec."""

from __future__ import annotations

import torch

from layerzip import Approximator, Estimate, FitContext, WeightView

from .config import KVLinearConfig
from .module import OP, ApproxKVLinear, resolve_layout


class PQKeyValue(Approximator):
    name = "pq_kv"
    description = "truncated-SVD keys/values, product-quantized, top-K retrieval per input"
    Params = KVLinearConfig
    module_class = ApproxKVLinear
    op = OP

    def needs_calibration(self, params) -> bool:
        return params.whiten or params.retrieval == "range"

    def check(self, view: WeightView, params) -> None:
        m, n = view.shape
        resolve_layout(params, m, n, min(m, n))  # what can be known before the SVD
        if params.use_bias is False and view.bias is not None:
            raise ValueError("use_bias is false but the layer has a bias (it would be dropped)")

    def estimate(self, view: WeightView, params) -> Estimate:
        """An upper bound in float32 units (the kept rank is known only after the SVD, so
        full rank): byte codes count ¼, plus codebooks, the whitening factor and the float
        keys/values when the config keeps them."""
        m, n = view.shape
        r = min(m, n)
        lay = resolve_layout(params, m, n, r)
        elems = 2 * r * lay["m_keys"] // 4 + lay["ks_keys"] * n        # key codes + codebooks
        elems += r * m // 4 + m if params.values_index_type == "SQ" else \
            r * lay["m_vals"] // 4 + lay["ks_vals"] * m                 # value codes (+ tables)
        if params.whiten:
            elems += n * n
        if lay["nlist"]:
            elems += lay["nlist"] * n + 2 * r
        if params.use_ste or not params.approx_inference or params.refine_exact_with_float_keys:
            elems += r * (n + m)
        elems += 1 + (m if view.bias is not None else 0)                 # threshold, bias
        return Estimate(elems, 2 * n * r + 2 * params.expected_K * m)

    def fit(self, view: WeightView, params, context: FitContext) -> ApproxKVLinear:
        m, n = view.shape
        module = ApproxKVLinear(n, m, params)
        with torch.no_grad():
            module.weight.copy_(view.dense(torch.float32))
            if module.bias is not None and view.bias is not None:
                module.bias.copy_(view.bias)
        stats = context.stats
        rows = stats.samples if stats is not None else None
        cov = stats.covariance if stats is not None and stats.gram is not None else None
        module.prepare(rows, covariance=cov, seed=context.seed)
        r = module.layout["rank"]
        module.fit_details = {"rank": r, "keys": 2 * r, "layout": module.layout,
                              "threshold": float(module.threshold) if params.retrieval == "range"
                              else None, "stored_bytes": sum(module.stored_bytes().values())}
        return module.to(dtype=view.dtype, device=view.device)
