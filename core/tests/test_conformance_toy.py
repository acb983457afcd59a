import pytest

from layerzip.testing import ApproximatorConformance


class TestToyConformance(ApproximatorConformance):
    method = "toy_lowrank"
    budgets = [{"rank": 1}, {"rank": 4}, {"rank": 16}]
    full_budget = {"rank": 32}
    bad_params = [{"rank": 0}, {"rank": 33}, {"rnak": 3}, {}]

    @pytest.fixture(autouse=True)
    def _registered(self, toy):
        yield
