"""layerzip-nystrom: CUR/Nyström approximation and structure-aware pivot strategies."""

from .method import Nystrom, NystromLinear, NystromParams
from .pivots import L2Pivots, LeveragePivots, UniformPivots, leverage_scores
from .views import KroneckerWeightView

__all__ = ["KroneckerWeightView", "L2Pivots", "LeveragePivots", "Nystrom", "NystromLinear",
           "NystromParams", "UniformPivots", "leverage_scores"]
