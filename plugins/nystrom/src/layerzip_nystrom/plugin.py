"""Entry point of layerzip-nystrom."""

import layerzip

from .circuits import CirkitMnist
from .cirkit_layers import CirkitSumLayerAdapter
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


@layerzip.hookimpl
def register_layer_adapters(register):
    register(CirkitSumLayerAdapter())


@layerzip.hookimpl
def register_model_sources(register):
    register(CirkitMnist())
