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
        """An upper bound (the kept rank is known only after the SVD): full rank, codes only."""
        m, n = view.shape
        r = min(m, n)
        lay = resolve_layout(params, m, n, r)
        elems = 2 * r * lay["m_keys"] // 4 + lay["m_keys"] * lay["ks_keys"] * (n // lay["m_keys"])
        elems += r * m // 4 + (m if view.bias is not None else 0)
        if params.whiten:
            elems += n * n
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
