from layerzip.testing import ApproximatorConformance


class TestSvd(ApproximatorConformance):
    method = "svd"
    budgets = [{"rank": 1}, {"rank": 4}, {"energy": 0.999}, {"rank": 24}]
    full_budget = {"rank": 32}
    bad_params = [{"rank": 0}, {"rank": 33}, {}, {"rank": 4, "energy": 0.9}, {"ratio": 1.0},
                  {"energy": 1.5}, {"rnak": 3}]


class TestSvdWhitened(ApproximatorConformance):
    method = "svd"
    budgets = [{"rank": 2, "whiten": True}, {"rank": 8, "whiten": True},
               {"rank": 20, "whiten": True}]
    full_budget = {"rank": 32, "whiten": True}
    full_budget_tolerance = 1e-6
    bad_params = [{"whiten": "sometimes", "rank": 2}]


class TestRsvd(ApproximatorConformance):
    method = "rsvd"
    budgets = [{"rank": 1}, {"rank": 6}, {"rank": 20}]
    full_budget = {"rank": 32, "oversampling": 0}
    bad_params = [{"rank": 4, "oversampling": -1}, {"energy": 0.9},
                  {"rank": 4, "power_iterations": -2}]


class TestAdaptive(ApproximatorConformance):
    method = "adaptive"
    budgets = [{"error_tolerance": 0.5}, {"error_tolerance": 0.1}, {"error_tolerance": 0.01}]
    full_budget = {"error_tolerance": 1e-9}
    bad_params = [{"error_tolerance": 0}, {"error_tolerance": 1.5}, {}, {"error_tolerance": 0.1,
                                                                        "max_rank": 99}]
