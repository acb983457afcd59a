"""KVLinearConfig: every option of the key-value layer, validated before any work."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from layerzip import Params

FAISS_ONLY = ("nlist", "m_pq_keys", "nbits_keys", "nprobe", "m_pq_vals", "nbits_vals")
NANOPQ_ONLY = ("npq_M_keys", "npq_Ks_keys", "npq_M_vals", "npq_Ks_vals")
SQ_TYPES = ("QT_8bit", "QT_4bit", "QT_8bit_uniform", "QT_fp16")


class KVLinearConfig(Params):
    """y = Σ_{i ∈ S(x)} (kᵢ·x) uᵢ + b over the keys kᵢ = σᵢvᵢ and values uᵢ of W's truncated SVD,
    S(x) the retrieved keys. The faiss and torch backends share the faiss-style options
    (``m_pq_*``, ``nbits_*``, ``nlist``, ``nprobe``); nanopq has its own (``npq_*``)."""

    backend: Literal["faiss", "nanopq", "torch"] = Field(default="torch", description=(
        "who trains the quantizers and runs the lookup (op kv_lookup); 'torch' needs neither "
        "faiss nor nanopq and runs on a GPU"))
    # the SVD
    energy_keep: float = Field(default=0.99, gt=0, le=1, description=(
        "keep the fewest singular triplets holding this fraction of Σσ²"))
    min_sigma: float = Field(default=0.0, ge=0, description="also drop σᵢ below this")
    # whitening and retrieval
    whiten: bool = Field(default=True, description=(
        "search with keys Lᵀk and queries L⁻¹x, Σ = E[xxᵀ] + ridge·mean(diag Σ)·I = L Lᵀ "
        "(needs calibration data); inner products are unchanged"))
    ridge: float = Field(default=1e-3, ge=0, description="relative ridge added to Σ")
    retrieval: Literal["topk", "range"] = Field(default="topk", description=(
        "'topk' = exactly expected_K keys per input; 'range' = every key scoring above a "
        "threshold calibrated so that expected_K come back on average"))
    expected_K: int = Field(default=32, ge=1)
    refine_exact_with_float_keys: bool = Field(default=False, description=(
        "re-score the retrieved keys with float keys (stored too: counted in the bytes)"))
    # keys and values (faiss-style names, used by faiss and torch)
    nlist: int | None = Field(default=None, ge=1, description=(
        "IVF lists over the keys (None: flat, or IVF chosen automatically when there are "
        "enough keys to train it)"))
    nprobe: int | None = Field(default=None, ge=1, description="IVF lists searched per query")
    m_pq_keys: int | None = Field(default=None, ge=1, description=(
        "PQ sub-quantizers of the keys; must divide in_features (None: largest divisor ≤ "
        "in_features/8)"))
    nbits_keys: int | None = Field(default=None, ge=1, le=8, description=(
        "bits per key sub-code (None: 8, lowered when there are too few keys to train it)"))
    use_gpu: bool = Field(default=False, description="faiss on a GPU (needs a GPU faiss build)")
    values_index_type: Literal["PQ", "SQ"] = Field(default="SQ")
    m_pq_vals: int | None = Field(default=None, ge=1, description="PQ sub-quantizers of values")
    nbits_vals: int | None = Field(default=None, ge=1, le=8)
    sq_type: Literal["QT_8bit", "QT_4bit", "QT_8bit_uniform", "QT_fp16"] | None = Field(
        default=None, description="scalar quantizer of the values (default QT_8bit)")
    # nanopq
    npq_M_keys: int | None = Field(default=None, ge=1)
    npq_Ks_keys: int | None = Field(default=None, ge=2, le=256)
    npq_M_vals: int | None = Field(default=None, ge=1)
    npq_Ks_vals: int | None = Field(default=None, ge=2, le=256)
    # training / inference
    use_ste: bool = Field(default=False, description=(
        "train through the exact low-rank path while the forward uses the retrieval "
        "(straight-through); keeps float keys and values"))
    approx_inference: bool = Field(default=True, description=(
        "False: eval uses the exact low-rank path (float keys and values are kept)"))
    use_bias: bool = Field(default=True)

    @model_validator(mode="after")
    def _consistent(self):
        set_ = self.model_fields_set
        if self.backend == "nanopq":
            wrong = [f for f in FAISS_ONLY if f in set_]
            if wrong:
                raise ValueError(f"{wrong} are faiss/torch options; with backend 'nanopq' use "
                                 f"npq_M_keys, npq_Ks_keys, npq_M_vals, npq_Ks_vals")
        else:
            wrong = [f for f in NANOPQ_ONLY if f in set_]
            if wrong:
                raise ValueError(f"{wrong} are nanopq options; set backend: nanopq, or use "
                                 f"m_pq_keys/nbits_keys/m_pq_vals/nbits_vals")
        if self.values_index_type == "SQ":
            wrong = [f for f in ("m_pq_vals", "nbits_vals", "npq_M_vals", "npq_Ks_vals")
                     if f in set_]
            if wrong:
                raise ValueError(f"{wrong} configure PQ values, but values_index_type is 'SQ' "
                                 f"(set values_index_type: PQ, or drop them)")
        elif "sq_type" in set_:
            raise ValueError("sq_type configures SQ values, but values_index_type is 'PQ'")
        if self.nprobe is not None and self.nlist is None:
            raise ValueError("nprobe needs an IVF index: set nlist too")
        if self.nprobe is not None and self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe {self.nprobe} exceeds nlist {self.nlist}")
        if self.nlist is not None and self.backend == "nanopq":
            raise ValueError("nlist (IVF) is not available with backend 'nanopq'")
        if self.use_gpu:
            if self.backend != "faiss":
                raise ValueError("use_gpu applies to backend 'faiss' (backend 'torch' runs on "
                                 "the module's device already)")
            ok, why = faiss_gpu_available()
            if not ok:
                raise ValueError(f"use_gpu: {why}")
        if self.backend in ("faiss", "nanopq"):
            mod = "faiss" if self.backend == "faiss" else "nanopq"
            if importlib.util.find_spec(mod) is None:
                raise ValueError(f"backend {self.backend!r} needs {mod}, which is not installed "
                                 f"(pip install {'faiss-cpu' if mod == 'faiss' else 'nanopq'}), "
                                 f"or use backend: torch")
        return self

    # -- resolved settings ---------------------------------------------------------------------
    @property
    def sq(self) -> str:
        return self.sq_type or "QT_8bit"


def faiss_gpu_available() -> tuple[bool, str]:
    if importlib.util.find_spec("faiss") is None:
        return False, "faiss is not installed"
    import faiss

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n < 1:
        return False, (f"the installed faiss {faiss.__version__} has no GPU support (or no GPU "
                       f"is visible); install faiss-gpu, or set use_gpu: false")
    return True, ""
