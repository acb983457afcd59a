"""layerzip-lowrank: low-rank approximations of linear layers and a low-rank GEMM API."""

from .backends import lowrank_matmul_reference
from .fp8_kernel import quantize_rows
from .gemm import AdaptiveLowRankGEMM, LowRankGEMM
from .methods import Adaptive, AdaptiveParams, Rsvd, RsvdParams, Svd, SvdParams, whitening_factor
from .module import LowRankLinear

__all__ = ["Adaptive", "AdaptiveLowRankGEMM", "AdaptiveParams", "LowRankGEMM", "LowRankLinear",
           "Rsvd", "RsvdParams", "Svd", "SvdParams", "lowrank_matmul_reference", "quantize_rows",
           "whitening_factor"]
