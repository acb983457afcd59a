from layerzip.testing import ApproximatorConformance


class TestKronecker(ApproximatorConformance):
    method = "kronecker"
    # 48×32 = (6·8)×(4·8): A is 6×4, B is 8×8, full rank = min(24, 64) = 24
    budgets = [{"factors": [[6, 4], [8, 8]], "rank": r} for r in (1, 4, 12)] + \
        [{"factors": [[6, 4], [8, 8]], "rank": 12, "residual_fraction": 0.2}]
    full_budget = {"factors": [[6, 4], [8, 8]], "rank": 24}
    bad_params = [{"factors": [[5, 4], [8, 8]]}, {"factors": [[6, 4], [8, 8]], "rank": 25},
                  {"rank": 2, "ratio": 0.5}, {"residual_fraction": 0.1, "residual_params": 10},
                  {"alpha": "magic"}, {"factors": [[0, 4], [8, 8]]}]


class TestKroneckerAuto(ApproximatorConformance):
    method = "kronecker"
    budgets = [{"ratio": 0.9}, {"ratio": 0.5}]
    full_budget = None
    bad_params = [{"ratio": 1.0}]
    check_compile = False  # covered by TestKronecker


class TestKroneckerBlockResidual(ApproximatorConformance):
    method = "kronecker"
    # a residual of whole 8×8 blocks of the factor grid (48×32 has 6·4 = 24 of them)
    budgets = [{"factors": [[6, 4], [8, 8]], "rank": 4, "residual_fraction": f,
                "residual_structure": "blocks"} for f in (0.1, 0.3, 0.6)]
    # every block kept (24 · (64 values + 1 index)): the residual alone makes it exact
    full_budget = {"factors": [[6, 4], [8, 8]], "rank": 1, "residual_params": 24 * 65,
                   "residual_structure": "blocks"}
    bad_params = [{"residual_structure": "rows"}]
    check_compile = False  # covered by TestKronecker


class TestKroneckerColumnResidual(ApproximatorConformance):
    method = "kronecker"
    # a residual of whole input columns (48 values each; 48×32 has 32 of them)
    budgets = [{"factors": [[6, 4], [8, 8]], "rank": 4, "residual_fraction": f,
                "residual_structure": "columns"} for f in (0.1, 0.3, 0.6)]
    # every column kept (32 · (48 values + 1 index)): the residual alone makes it exact
    full_budget = {"factors": [[6, 4], [8, 8]], "rank": 1, "residual_params": 32 * 49,
                   "residual_structure": "columns"}
    bad_params = [{"residual_structure": "rows"}]
    check_compile = False  # covered by TestKronecker
