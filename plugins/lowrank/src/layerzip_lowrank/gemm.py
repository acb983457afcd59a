"""Functional low-rank GEMM: ``LowRankGEMM()(a, b) ≈ a @ b`` by factoring the constant operand.

The realistic use is a weight: ``b`` is declared constant (``cache_b=True``) so its factors are
computed once and reused on every call; the product then runs on a ``lowrank_matmul`` backend.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

import layerzip

from .backends import OP
from .rank import rank_for_energy, rank_for_error


class LowRankGEMM(nn.Module):
    """Approximate ``a @ b`` for 2-D or batched 3-D operands through a rank-r factorization of b.

    - ``target_rank``: fixed rank (``rank_selection_method='fixed'`` implied);
    - ``rank_selection_method``: ``'auto'`` (⌊√min(K, N)⌋), ``'energy'`` (keep
      ``energy_threshold`` of Σσ²) or ``'fixed_fraction'`` (``fraction`` of min(K, N));
    - ``decomposition_method``: ``'svd'``, ``'randomized_svd'`` (torch.svd_lowrank with
      ``oversampling`` and ``power_iterations``) or ``'auto'`` (randomized when the rank is below a
      quarter of min(K, N) and min(K, N) > 512);
    - ``use_fp8`` / ``use_tensorrt``: None = use when available, True = require, False = never;
      ``auto_kernel``: otherwise let ``backend: auto`` pick the kernel.
    After a call, ``last_rank`` holds the rank used.
    """

    def __init__(self, target_rank: int | None = None,
                 rank_selection_method: Literal["auto", "energy", "fixed_fraction"] = "auto",
                 energy_threshold: float = 0.99, fraction: float = 0.25,
                 decomposition_method: Literal["svd", "randomized_svd", "auto"] = "auto",
                 oversampling: int = 10, power_iterations: int = 2,
                 use_fp8: bool | None = None, use_tensorrt: bool | None = None,
                 auto_kernel: bool = True, cache_b: bool = True):
        super().__init__()
        if rank_selection_method not in ("auto", "energy", "fixed_fraction"):
            raise ValueError(f"rank_selection_method must be 'auto', 'energy' or "
                             f"'fixed_fraction', got {rank_selection_method!r}")
        if decomposition_method not in ("svd", "randomized_svd", "auto"):
            raise ValueError(f"decomposition_method must be 'svd', 'randomized_svd' or 'auto', "
                             f"got {decomposition_method!r}")
        if decomposition_method == "randomized_svd" and rank_selection_method == "energy" \
                and target_rank is None:
            raise ValueError("'energy' needs the whole spectrum: use decomposition_method='svd'")
        if target_rank is not None and target_rank <= 0:
            raise ValueError(f"target_rank must be positive, got {target_rank}")
        if not 0 < energy_threshold <= 1 or not 0 < fraction <= 1:
            raise ValueError("energy_threshold and fraction must lie in (0, 1]")
        self.target_rank = target_rank
        self.rank_selection_method = rank_selection_method
        self.energy_threshold = energy_threshold
        self.fraction = fraction
        self.decomposition_method = decomposition_method
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        self.use_fp8, self.use_tensorrt, self.auto_kernel = use_fp8, use_tensorrt, auto_kernel
        self.cache_b = cache_b
        self._cache_key = None
        self._factors: tuple[Tensor, Tensor] | None = None
        self.last_rank: int | None = None

    # -- rank & factors ----------------------------------------------------------------------
    def _fixed_rank(self, k: int) -> int | None:
        if self.target_rank is not None:
            return min(self.target_rank, k)
        if self.rank_selection_method == "auto":
            return max(1, int(k ** 0.5))
        if self.rank_selection_method == "fixed_fraction":
            return max(1, int(self.fraction * k))
        return None

    def _select_rank(self, s: Tensor, k: int) -> int:
        r = self._fixed_rank(k)
        return r if r is not None else rank_for_energy(s, self.energy_threshold)

    def _decompose(self, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = min(b.shape[-2:])
        r = self._fixed_rank(k)
        method = self.decomposition_method
        if method == "auto":
            method = "randomized_svd" if r is not None and r < k // 4 and k > 512 else "svd"
        if method == "randomized_svd" and r is not None:
            u, s, v = torch.svd_lowrank(b, q=min(r + self.oversampling, k),
                                        niter=self.power_iterations)
            return u, s, v
        u, s, vh = torch.linalg.svd(b, full_matrices=False)
        return u, s, vh.mT

    def factorize(self, b: Tensor) -> tuple[Tensor, Tensor]:
        """(p, q) with b ≈ p qᵀ: p (…, K, r), q (…, N, r)."""
        work = b.float() if b.dtype in (torch.float16, torch.bfloat16) else b
        u, s, v = self._decompose(work)
        k = min(b.shape[-2:])
        # a batch of operands shares one rank: the largest any member needs
        r = max(self._select_rank(si, k) for si in s.reshape(-1, s.shape[-1]))
        root = s[..., :r].sqrt().unsqueeze(-2)
        return (u[..., :r] * root).to(b.dtype), (v[..., :r] * root).to(b.dtype)

    def _backend(self, device: torch.device):
        reg = layerzip.get_registry()
        for flag, name in ((self.use_fp8, "fp8"), (self.use_tensorrt, "tensorrt")):
            if flag:
                return reg.backend(OP, name)  # raises with the reason when unavailable
        if not self.auto_kernel:
            return reg.backend(OP, "torch")
        for b in reg.backends_for(OP):
            if (b.name == "fp8" and self.use_fp8 is False) or \
                    (b.name == "tensorrt" and self.use_tensorrt is False):
                continue
            if b.available()[0]:
                return b
        return reg.reference_backend(OP)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"a @ b needs a.shape[-1] == b.shape[-2], got {tuple(a.shape)} @ "
                             f"{tuple(b.shape)}")
        key = (b.data_ptr(), b._version, tuple(b.shape), b.dtype, b.device)
        if self.cache_b and self._factors is not None and key == self._cache_key:
            p, q = self._factors
        else:
            p, q = self.factorize(b)
            if self.cache_b:
                self._cache_key, self._factors = key, (p, q)
        self.last_rank = p.shape[-1]
        if p.dim() == 2:  # the op computes x v uᵀ with v = p (K×r), u = q (N×r)
            kernel = self._backend(a.device)
            if not kernel.accepts(a, p, q):
                kernel = layerzip.get_registry().reference_backend(OP)
            return kernel(a, q, p, None)
        return (a @ p) @ q.mT

    @staticmethod
    def compute_error(exact: Tensor, approx: Tensor) -> float:
        """Relative Frobenius error ‖exact − approx‖ / ‖exact‖."""
        return float(torch.linalg.vector_norm((exact - approx).double())
                     / torch.linalg.vector_norm(exact.double()).clamp_min(1e-300))


class AdaptiveLowRankGEMM(LowRankGEMM):
    """``forward(a, b) -> (result, rank_used)``: the smallest rank whose relative error in b,
    computed from b's singular values, is ≤ ``error_tolerance`` (capped by ``max_rank``)."""

    def __init__(self, error_tolerance: float, max_rank: int | None = None, **kwargs):
        if not 0 < error_tolerance < 1:
            raise ValueError(f"error_tolerance must lie in (0, 1), got {error_tolerance}")
        kwargs.setdefault("decomposition_method", "svd")
        super().__init__(rank_selection_method="energy", **kwargs)
        self.error_tolerance, self.max_rank = error_tolerance, max_rank

    def _decompose(self, b):
        u, s, vh = torch.linalg.svd(b, full_matrices=False)
        return u, s, vh.mT

    def _select_rank(self, s: Tensor, k: int) -> int:
        return rank_for_error(s, self.error_tolerance, self.max_rank)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, int]:
        result = super().forward(a, b)
        return result, self.last_rank
