"""layerzip-kronecker: sums of Kronecker products (Van Loan–Pitsianis) + sparse residual."""

from .factorize import kron_sum, nearest_kronecker, rearrange
from .method import Kronecker, KroneckerParams
from .module import KroneckerLinear, kron_matmul_reference

__all__ = ["Kronecker", "KroneckerLinear", "KroneckerParams", "kron_matmul_reference", "kron_sum",
           "nearest_kronecker", "rearrange"]
