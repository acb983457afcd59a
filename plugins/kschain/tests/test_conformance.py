from layerzip.testing import ApproximatorConformance


class TestKSChain(ApproximatorConformance):
    method = "ks_chain"
    # 48×32 → the chain (1,6r,8,4)(6,8,4r,1); rank 8 = min(b₂, c₁) makes every sub-block exact
    budgets = [{"rank": 1}, {"rank": 2}, {"rank": 4}, {"rank": 6}]
    full_budget = {"rank": 8}
    bad_params = [{"rank": 9}, {"rank": 2, "ratio": 0.5},
                  {"patterns": [[1, 6, 8, 4], [6, 8, 8, 1]]},
                  {"patterns": [[1, 2, 8, 4], [2, 8, 4, 1]]}, {"patterns": [[1, 6, 8, 4]],
                                                             "rank": 2},
                  {"init": "random"}, {"num_factors": 0}, {"ratio": 0.999},
                  {"pattern": [[1, 1, 1, 1]]}]


class TestKSChainDeep(ApproximatorConformance):
    method = "ks_chain"
    budgets = [{"num_factors": 3, "rank": 1}, {"num_factors": 3, "rank": 2},
               {"num_factors": 3, "rank": 4}]
    full_budget = None
    bad_params = [{"num_factors": 3, "patterns": [[1, 48, 32, 1]]}]
    check_compile = False  # covered above


class TestKSChainRatio(ApproximatorConformance):
    method = "ks_chain"
    budgets = [{"ratio": 0.75}, {"ratio": 0.5}]
    full_budget = None
    bad_params = [{"ratio": 1.0}]
    check_compile = False
