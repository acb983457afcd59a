import math

import pytest
import torch
from pydantic import ValidationError

from layerzip_lowrank.methods import SvdParams
from layerzip_lowrank.rank import rank_for_energy, rank_for_error, rank_from_shape


def test_fixed_rank():
    assert rank_from_shape(SvdParams(rank=7), 100, 50) == 7


def test_fraction_of_min_dimension():
    assert rank_from_shape(SvdParams(fraction=0.25), 100, 50) == 12


def test_ratio_of_parameters_removed():
    m, n = 576, 1536
    r = rank_from_shape(SvdParams(ratio=0.2), m, n)
    assert r == math.floor(0.8 * m * n / (m + n))
    assert r * (m + n) <= 0.8 * m * n < (r + 1) * (m + n)


def test_auto_is_sqrt_of_min_dimension():
    assert rank_from_shape(SvdParams(auto=True), 300, 4096) == 17


def test_energy_rank_keeps_that_fraction():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert rank_for_energy(s, 16 / 22) == 1
    assert rank_for_energy(s, 0.8) == 2
    assert rank_for_energy(s, 21 / 22) == 3
    assert rank_for_energy(s, 1.0) == 4
    assert rank_from_shape(SvdParams(energy=0.9), 10, 10) is None


def test_error_rank_from_singular_values():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert rank_for_error(s, math.sqrt(6 / 22) + 1e-9) == 1
    assert rank_for_error(s, math.sqrt(2 / 22) + 1e-9) == 2
    assert rank_for_error(s, 1e-12) == 4
    assert rank_for_error(s, 1e-12, max_rank=3) == 3


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "ratio": 0.5}, {"auto": True, "rank": 3},
                                    {"energy": 0}, {"fraction": 1.2}, {"ratio": -0.1}])
def test_exactly_one_valid_rule(kwargs):
    with pytest.raises(ValidationError):
        SvdParams(**kwargs)
