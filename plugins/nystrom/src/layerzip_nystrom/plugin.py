"""Entry point of layerzip-nystrom."""

import layerzip

from .method import Nystrom
from .pivots import L2Pivots, LeveragePivots, UniformPivots


@layerzip.hookimpl
def register_approximators(register):
    register(Nystrom())


@layerzip.hookimpl
def register_pivot_strategies(register):
    register(UniformPivots())
    register(L2Pivots())
    register(LeveragePivots())
