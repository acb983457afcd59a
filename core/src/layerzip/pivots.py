"""PivotStrategy: picks k row or column indices of a WeightView."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .views import WeightView


class PivotStrategy:
    """Subclass, set ``name`` and implement :meth:`select`. Strategies should use the view's
    ``rows``/``cols``/norms (and its ``structure``) rather than materializing W."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def select(self, view: WeightView, k: int, axis: Literal["rows", "cols"], *,
               generator: torch.Generator, replace: bool = False) -> Tensor:
        """A LongTensor of k indices along ``axis``, reproducible for a given generator."""
        raise NotImplementedError
