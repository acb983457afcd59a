"""ApproxKVLinear: a linear layer stored as quantized key-value pairs, evaluated by retrieval.

W = U Σ Vᵀ truncated to r triplets gives keys kᵢ = σᵢvᵢ (n-dim) and values uᵢ (m-dim), so
W x = Σᵢ uᵢ (kᵢ·x). For an input x the layer retrieves the keys with the largest |kᵢ·x| and sums
only their value terms. Retrieval is a maximum-inner-product search over the 2r signed keys
±kᵢ (the sign of kᵢ·x depends on x), on product-quantized keys, optionally in a whitened space:
with Σ = E[xxᵀ] + ridge = L Lᵀ the index holds Lᵀkᵢ and the query is L⁻¹x, and
(Lᵀk)·(L⁻¹x) = k·x exactly — quantization error is then spent where the inputs are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import layerzip
from layerzip import ApproxModule

from .config import KVLinearConfig
from .quantize import (
    SQ_BITS,
    adc_scores,
    pq_decode,
    pq_encode,
    sq_decode,
    sq_encode,
    sq_train,
    train_pq,
)

OP = "kv_lookup"


@dataclass
class KVIndex:
    """What a kv_lookup backend searches: PQ codes of the 2r signed keys (ids i and r + i are
    +kᵢ and −kᵢ), their codebooks, and optionally IVF lists (coarse centroids + each key's
    list) with nprobe."""

    codebooks: Tensor
    codes: Tensor
    coarse: Tensor | None = None
    lists: Tensor | None = None
    nprobe: int = 1
    version: tuple = ()


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, cap) + 1) if n % d == 0)


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def resolve_layout(cfg: KVLinearConfig, out_features: int, in_features: int, rank: int
                   ) -> dict:
    """Every size the layer needs, from the config and the kept rank; ValueError (naming the
    option and the fix) for combinations that cannot work."""
    nanopq = cfg.backend == "nanopq"
    keys = 2 * rank
    if cfg.expected_K > rank:
        raise ValueError(f"expected_K {cfg.expected_K} exceeds the {rank} keys this layer keeps "
                         f"(energy_keep {cfg.energy_keep}): lower expected_K or raise energy_keep")
    mk = cfg.npq_M_keys if nanopq else cfg.m_pq_keys
    mk_given = mk is not None
    mk = mk or _largest_divisor_at_most(in_features, max(1, in_features // 8))
    if in_features % mk:
        name = "npq_M_keys" if nanopq else "m_pq_keys"
        divs = [d for d in range(1, in_features + 1) if in_features % d == 0]
        raise ValueError(f"{name} {mk} must divide in_features {in_features} (divisors: {divs})")
    if nanopq and cfg.npq_Ks_keys is not None:
        ksk, ks_given, ks_name = cfg.npq_Ks_keys, True, "npq_Ks_keys"
    elif not nanopq and cfg.nbits_keys is not None:
        ksk, ks_given, ks_name = 2 ** cfg.nbits_keys, True, "nbits_keys"
    else:
        ksk, ks_given, ks_name = min(256, _pow2_at_most(keys)), False, ""
    if ks_given and ksk > keys:
        fix = (f"≤ {int(math.log2(_pow2_at_most(keys)))}" if ks_name == "nbits_keys"
               else f"≤ {keys}")
        raise ValueError(f"{ks_name} gives {ksk} centroids per sub-quantizer, but there are only "
                         f"{keys} signed keys (r = {rank}) to train them: set {ks_name} {fix}, "
                         f"or leave it unset to choose automatically")
    nlist, nprobe = cfg.nlist, cfg.nprobe
    if nlist is not None and nlist > 1:
        if keys < nlist:
            raise ValueError(f"IVF nlist {nlist} needs at least {nlist} keys to train its coarse "
                             f"quantizer; this layer has {keys} signed keys (r = {rank}): lower "
                             f"nlist to ≤ {keys}, or leave it unset (flat index)")
        nprobe = nprobe or max(1, nlist // 4)
    elif nlist is None and keys >= 39 * 32:  # enough keys for a useful IVF (faiss's 39·nlist)
        nlist = min(256, _pow2_at_most(int(math.sqrt(keys))))
        nprobe = max(1, nlist // 4)
    else:
        nlist, nprobe = 0, 0
    layout = {"rank": rank, "m_keys": mk, "ks_keys": ksk, "nlist": nlist or 0,
              "nprobe": nprobe or 0, "m_keys_given": mk_given}
    if cfg.values_index_type == "PQ":
        mv = (cfg.npq_M_vals if nanopq else cfg.m_pq_vals) or \
            _largest_divisor_at_most(out_features, max(1, out_features // 8))
        if out_features % mv:
            name = "npq_M_vals" if nanopq else "m_pq_vals"
            raise ValueError(f"{name} {mv} must divide out_features {out_features}")
        ksv = (cfg.npq_Ks_vals if nanopq else (2 ** cfg.nbits_vals if cfg.nbits_vals else None))
        if ksv is not None and ksv > rank:
            raise ValueError(f"values PQ with {ksv} centroids needs ≥ {ksv} values to train; "
                             f"this layer keeps {rank}: lower nbits_vals/npq_Ks_vals")
        layout.update(m_vals=mv, ks_vals=ksv or min(256, _pow2_at_most(rank)))
    return layout


class ApproxKVLinear(ApproxModule):
    """Drop-in for nn.Linear: starts dense (``weight``, trainable); :meth:`prepare` builds the
    key-value form from the current weight (and calibration inputs for whitening / the range
    threshold) and drops the dense weight. Build it from a layer with :meth:`from_linear`."""

    is_linear = False  # retrieval makes the output nonlinear in x

    def __init__(self, in_features: int, out_features: int, config: KVLinearConfig | dict | None
                 = None, *, layout: dict | None = None):
        super().__init__()
        cfg = config if isinstance(config, KVLinearConfig) else KVLinearConfig(**(config or {}))
        self.in_features, self.out_features, self.cfg = int(in_features), int(out_features), cfg
        self.layout = dict(layout) if layout else None
        self.bias = nn.Parameter(torch.zeros(out_features)) if cfg.use_bias else None
        self._values_cache: tuple | None = None
        if self.layout is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            self._allocate(self.layout)
        self._set_backend()

    @property
    def prepared(self) -> bool:
        return self.layout is not None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: KVLinearConfig | dict | None = None
                    ) -> ApproxKVLinear:
        m = cls(linear.in_features, linear.out_features, config)
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if m.bias is not None and linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m.to(linear.weight.device)

    def _set_backend(self) -> None:
        kernel = layerzip.get_backend(OP, self.cfg.backend)
        self.backend_name, self._kernel = kernel.name, kernel
        self._reference = layerzip.get_registry().reference_backend(OP)

    def _keeps_floats(self) -> bool:
        c = self.cfg
        return c.use_ste or not c.approx_inference or c.refine_exact_with_float_keys

    def _allocate(self, lay: dict) -> None:
        n, m, r = self.in_features, self.out_features, lay["rank"]
        c = self.cfg
        self.register_buffer("whiten_l", torch.zeros((n, n) if lay.get("whitened") else (0, 0)))
        self.register_buffer("key_codebooks", torch.zeros(lay["m_keys"], lay["ks_keys"],
                                                          n // lay["m_keys"]))
        self.register_buffer("key_codes", torch.zeros(2 * r, lay["m_keys"], dtype=torch.uint8))
        self.register_buffer("coarse", torch.zeros(lay["nlist"], n))
        self.register_buffer("key_lists", torch.zeros(2 * r if lay["nlist"] else 0,
                                                      dtype=torch.int32))
        self.register_buffer("threshold", torch.zeros(()))
        if c.values_index_type == "PQ":
            self.register_buffer("val_codebooks", torch.zeros(lay["m_vals"], lay["ks_vals"],
                                                              m // lay["m_vals"]))
            self.register_buffer("val_codes", torch.zeros(r, lay["m_vals"], dtype=torch.uint8))
        else:
            dt = torch.int16 if c.sq == "QT_fp16" else torch.uint8
            self.register_buffer("val_codes", torch.zeros(r, m, dtype=dt))
            self.register_buffer("val_vmin", torch.zeros(m))
            self.register_buffer("val_vdiff", torch.ones(m))
        if self._keeps_floats():
            self.key_weight = nn.Parameter(torch.zeros(r, n), requires_grad=c.use_ste)
            self.value_weight = nn.Parameter(torch.zeros(m, r), requires_grad=c.use_ste)
        else:
            self.key_weight = self.value_weight = None

    # -- building ----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, calibration: Tensor | None = None, *, covariance: Tensor | None = None,
                seed: int = 0) -> ApproxKVLinear:
        """Build the key-value form from the current weight. ``calibration`` (N, in) rows feed
        the whitening (unless ``covariance`` E[xxᵀ] is given) and the range threshold; one of
        them is required when either is on."""
        c = self.cfg
        if self.prepared:
            raise RuntimeError("already prepared; call requantize() to refresh the codes after "
                               "training the float keys/values")
        need = [what for what, on in (("whiten", c.whiten), ("retrieval 'range'",
                                                             c.retrieval == "range")) if on]
        if need and (calibration is None or calibration.shape[0] < 2) and \
                not (covariance is not None and c.retrieval == "topk"):
            raise ValueError(f"{' and '.join(need)} need calibration inputs: call "
                             f"prepare(x) with rows of this layer's inputs, or set "
                             f"whiten: false / retrieval: topk")
        device, dtype = self.weight.device, self.weight.dtype
        w = self.weight.detach().double().cpu()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        energy = (s ** 2).cumsum(0) / (s ** 2).sum().clamp_min(1e-300)
        r = int((energy < c.energy_keep - 1e-12).sum()) + 1
        r = max(1, min(r, int((s >= c.min_sigma).sum()) or 1))
        lay = resolve_layout(c, self.out_features, self.in_features, r)
        lay["whitened"] = bool(c.whiten)
        keys = (s[:r, None] * vh[:r])                                  # (r, n)
        values = u[:, :r]                                               # (m, r)
        x = None if calibration is None else calibration.detach().reshape(
            -1, self.in_features).double().cpu()
        if c.whiten:
            cov = covariance.double().cpu().clone() if covariance is not None else \
                x.t() @ x / x.shape[0]
            cov += c.ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(cov.shape[0],
                                                                             dtype=cov.dtype)
            chol = torch.linalg.cholesky(cov)
            search_keys = keys @ chol                                   # rows: Lᵀkᵢ
        else:
            chol, search_keys = None, keys
        signed = torch.cat([search_keys, -search_keys]).float()
        trainer = c.backend
        codebooks = train_pq(signed, lay["m_keys"], lay["ks_keys"], trainer, seed)
        codes = pq_encode(signed, codebooks)
        del self.weight
        self.layout = lay
        self._allocate(lay)
        self.key_codebooks.copy_(codebooks)
        self.key_codes.copy_(codes)
        if chol is not None:
            self.whiten_l.copy_(chol.float())
        if lay["nlist"]:
            decoded = pq_decode(codes, codebooks)
            coarse = train_pq(decoded, 1, lay["nlist"], trainer, seed + 101)[0]
            self.coarse.copy_(coarse)
            self.key_lists.copy_((decoded @ coarse.t()).argmax(1).to(torch.int32))
        self._store_values(values.float(), seed)
        if self.key_weight is not None:
            self.key_weight.copy_(keys.float())
            self.value_weight.copy_(values.float())
        self.to(device=device, dtype=dtype)
        if c.retrieval == "range":
            self.calibrate_threshold(x.to(device=device, dtype=dtype))
        return self

    def _store_values(self, values: Tensor, seed: int) -> None:
        c, lay = self.cfg, self.layout
        vecs = values.t().contiguous()                                  # (r, m): one per key
        if c.values_index_type == "PQ":
            cb = train_pq(vecs, lay["m_vals"], lay["ks_vals"], c.backend, seed + 7)
            self.val_codebooks.copy_(cb)
            self.val_codes.copy_(pq_encode(vecs, cb))
        else:
            vmin, vdiff = sq_train(vecs, c.sq)
            self.val_vmin.copy_(vmin)
            self.val_vdiff.copy_(vdiff)
            self.val_codes.copy_(sq_encode(vecs, c.sq, vmin, vdiff))
        self._values_cache = None

    @torch.no_grad()
    def requantize(self, seed: int = 0) -> None:
        """Re-encode keys and values from the (trained) float factors, same codebook sizes."""
        if self.key_weight is None:
            raise RuntimeError("no float keys/values are kept (use_ste, refine_exact_with_"
                               "float_keys or approx_inference: false keep them)")
        keys = self.key_weight.detach().double().cpu()
        if self.whiten_l.numel():
            keys = keys @ self.whiten_l.double().cpu()
        signed = torch.cat([keys, -keys]).float()
        cb = train_pq(signed, self.layout["m_keys"], self.layout["ks_keys"], self.cfg.backend,
                      seed)
        self.key_codebooks.copy_(cb)
        self.key_codes.copy_(pq_encode(signed, cb))
        if self.layout["nlist"]:
            decoded = pq_decode(self.key_codes, cb)
            self.key_lists.copy_((decoded @ self.coarse.float().cpu().t()).argmax(1).to(
                torch.int32))
        self._store_values(self.value_weight.detach().float().cpu(), seed)

    @torch.no_grad()
    def calibrate_threshold(self, x: Tensor) -> float:
        """The range threshold τ such that on these inputs the mean number of signed keys
        scoring above τ is expected_K (the (N·K)-th largest approximate score)."""
        scores = self._approx_scores(self.whiten_query(x.reshape(-1, self.in_features)))
        k = self.cfg.expected_K * scores.shape[0]
        tau = scores.flatten().float().kthvalue(scores.numel() - k + 1).values
        self.threshold.copy_(tau)
        return float(tau)

    # -- evaluation --------------------------------------------------------------------------
    def whiten_query(self, x: Tensor) -> Tensor:
        if not self.whiten_l.numel():
            return x
        return torch.linalg.solve_triangular(self.whiten_l.to(x.dtype), x.t(), upper=False).t()

    def index(self) -> KVIndex:
        lay = self.layout
        return KVIndex(self.key_codebooks, self.key_codes,
                       self.coarse if lay["nlist"] else None,
                       self.key_lists if lay["nlist"] else None, lay["nprobe"],
                       (id(self), self.key_codes._version, self.key_codebooks._version))

    def _approx_scores(self, q: Tensor) -> Tensor:
        return adc_scores(q, self.key_codebooks, self.key_codes)

    def decoded_values(self) -> Tensor:
        """Values (r, m) decoded from their codes, cached until the codes change."""
        key = (self.val_codes._version, self.val_codes.data_ptr(), self.val_codes.device)
        if self._values_cache is None or self._values_cache[0] != key:
            if self.cfg.values_index_type == "PQ":
                v = pq_decode(self.val_codes, self.val_codebooks)
            else:
                v = sq_decode(self.val_codes, self.cfg.sq, self.val_vmin, self.val_vdiff)
            self._values_cache = (key, v)
        return self._values_cache[1]

    def lookup(self, x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(ids (T, K'), approximate scores, valid) of the retrieved signed keys."""
        q = self.whiten_query(x2)
        kernel = self._kernel if self._kernel.accepts(q) else self._reference
        if self.cfg.retrieval == "topk":
            return kernel(q, self.index(), k=self.cfg.expected_K, threshold=None)
        return kernel(q, self.index(), k=None, threshold=float(self.threshold))

    def selection(self, x2: Tensor) -> Tensor:
        """(T, r) coefficients: for each retrieved signed key, ±its score on key i."""
        ids, scores, valid = self.lookup(x2)
        r = self.layout["rank"]
        sign = torch.where(ids >= r, -1.0, 1.0).to(scores.dtype)
        if self.cfg.refine_exact_with_float_keys:
            exact = x2 @ self.key_weight.t()                             # (T, r)
            scores = exact.gather(1, (ids % r).clamp_min(0)) * sign
        coef = torch.zeros(x2.shape[0], r, device=x2.device, dtype=scores.dtype)
        coef.scatter_add_(1, (ids % r).clamp_min(0), torch.where(valid, scores * sign, 0.0))
        return coef

    def _float_selection(self, z: Tensor) -> Tensor:
        """(T, r) 0/1 mask of the keys retrieval picks on exact scores z = x Kᵀ (top-K of |z|,
        or |z| above the threshold)."""
        mag = z.abs()
        if self.cfg.retrieval == "topk":
            idx = mag.topk(self.cfg.expected_K, dim=1).indices
            return torch.zeros_like(z).scatter_(1, idx, 1.0)
        return (mag > self.threshold).to(z.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.prepared:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        c = self.cfg
        training_ste = self.training and c.use_ste and torch.is_grad_enabled()
        if training_ste:
            # straight-through: the forward value is the retrieval's (top-K keys on the current
            # float keys), the gradient is the exact low-rank path's; requantize() afterwards
            z = x2 @ self.key_weight.t()
            exact = z @ self.value_weight.t()
            with torch.no_grad():  # the retrieval as it will be once requantize() re-encodes
                sel = self._float_selection(z.detach())
            approx = (z * sel) @ self.value_weight.t()
            y = exact + (approx - exact).detach()   # forward: retrieval; backward: exact path
        elif not c.approx_inference:
            y = (x2 @ self.key_weight.t()) @ self.value_weight.t()
        else:
            y = self.selection(x2) @ self.decoded_values().to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    # -- persistence -------------------------------------------------------------------------
    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "config": self.cfg.model_dump(exclude_unset=True), "layout": self.layout}

    @classmethod
    def from_config(cls, config: dict) -> ApproxKVLinear:
        return cls(config["in_features"], config["out_features"], config["config"],
                   layout=config["layout"])

    def stored_bytes(self) -> dict:
        """Bytes of what is stored, by part (4-bit SQ codes counted packed)."""
        parts: dict[str, int] = {}
        for name, t in self.state_dict().items():
            size = t.numel() * t.element_size()
            if name == "val_codes" and self.cfg.values_index_type == "SQ" and \
                    SQ_BITS[self.cfg.sq] == 4:
                size = (t.numel() + 1) // 2
            if name == "key_codes" and self.layout["ks_keys"] < 256:
                size = math.ceil(t.shape[0] * t.shape[1] * math.log2(self.layout["ks_keys"]) / 8)
            parts[name] = size
        return parts

    def extra_repr(self) -> str:
        if not self.prepared:
            return f"in_features={self.in_features}, out_features={self.out_features}, dense"
        lay = self.layout
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={lay['rank']}, K={self.cfg.expected_K} ({self.cfg.retrieval}), keys "
                f"PQ{lay['m_keys']}x{lay['ks_keys']}, values {self.cfg.values_index_type}, "
                f"backend={self.backend_name}")
