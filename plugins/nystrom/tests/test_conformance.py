from layerzip.testing import ApproximatorConformance


class TestNystromL2TopOptimal(ApproximatorConformance):
    method = "nystrom"
    # l2 scores do not depend on k, so 'top' pivots are nested and the optimal middle's error
    # cannot grow (projections onto growing subspaces)
    budgets = [{"rank": r, "pivots": "l2", "selection": "top", "middle": "optimal"}
               for r in (2, 8, 24)]
    full_budget = {"rank": 32, "pivots": "l2", "selection": "top"}
    full_budget_tolerance = 1e-6
    bad_params = [{"rank": 0}, {"rank": 33}, {"rank": 4, "pivots": "levrage"},
                  {"rank": 4, "selection": "best"}, {"rank": 4, "middle": "median"}]


class TestNystromSampled(ApproximatorConformance):
    method = "nystrom"
    budgets = [{"rank": 2, "pivots": "leverage"}, {"rank": 30, "pivots": "leverage"}]
    full_budget = {"rank": 32, "pivots": "uniform"}
    full_budget_tolerance = 1e-6
    bad_params = [{"rank": 2, "replace": "maybe"}]
    check_compile = False
