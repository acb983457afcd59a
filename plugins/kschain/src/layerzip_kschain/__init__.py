"""layerzip-kschain: Kronecker-sparse (butterfly / Monarch) chains W ≈ K_L ⋯ K_1."""

from .chain import chain_dense, chain_matmul_bmm, factor_dense, factor_from_dense, factor_matmul
from .fit import closed_form, project_chain, project_pair, refine
from .method import KSChain, KSChainParams
from .module import OP, KSChainLinear
from .patterns import (
    ChainChoice,
    Pattern,
    PatternError,
    best_chain,
    butterfly_chain,
    chain_params,
    check_chain,
    compose,
    product_pattern,
    rank_chain,
)

__all__ = ["OP", "ChainChoice", "KSChain", "KSChainLinear", "KSChainParams", "Pattern",
           "PatternError", "best_chain", "butterfly_chain", "chain_dense", "chain_matmul_bmm",
           "chain_params", "check_chain", "closed_form", "compose", "factor_dense",
           "factor_from_dense", "factor_matmul", "product_pattern", "project_chain",
           "project_pair", "rank_chain", "refine"]
