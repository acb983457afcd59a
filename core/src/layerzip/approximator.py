"""Approximator (a method), ApproxModule (what it puts in place of a layer) and what fit
receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from .views import WeightView


class Params(BaseModel):
    """Base for a method's params: unknown fields are rejected, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Estimate:
    """Cost of a layer: stored parameters (bias included) and multiply-add FLOPs per input row."""

    params: int
    flops_per_token: int

    @classmethod
    def dense(cls, out_features: int, in_features: int, bias: bool) -> Estimate:
        return cls(out_features * in_features + (out_features if bias else 0),
                   2 * out_features * in_features)


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input, gathered by :func:`layerzip.compress`.

    ``gram`` is XᵀX accumulated in float64 over every calibration row (in × in); ``count`` the
    number of rows; ``samples`` a bounded, evenly spread subset of input rows (float32) and
    ``holdout`` the same from the held-out batches (used only to measure error, never to fit).
    """

    gram: Tensor | None = None
    count: int = 0
    samples: Tensor | None = None
    holdout: Tensor | None = None

    @property
    def covariance(self) -> Tensor:
        """E[x xᵀ] (float64)."""
        if self.gram is None or self.count == 0:
            raise ValueError("no calibration statistics were gathered for this layer")
        return self.gram / self.count


@dataclass
class FitContext:
    """What a method's ``fit`` gets besides the weight and its params."""

    name: str
    backend: str = "auto"
    stats: LayerStats | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from the run seed and the layer name: reproducible per layer."""
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + sum(map(ord, self.name)) * 7919) % (2**63))
        return g


class ApproxModule(nn.Module):
    """Base of every replacement layer.

    A subclass keeps the original's call semantics (``y = x Wᵀ + b`` over the last dimension),
    dtype and device; it sets ``in_features``/``out_features``; :meth:`config` returns JSON data
    enough for :meth:`from_config` to build it empty (shapes right, values arbitrary), so that
    :func:`layerzip.load` can rebuild it and fill it from safetensors.
    """

    #: False for methods whose forward cannot be differentiated (the kit then skips that check).
    supports_backward: ClassVar[bool] = True
    #: False for modules whose output is not linear in x (no dense weight exists to compare).
    is_linear: ClassVar[bool] = True

    in_features: int
    out_features: int

    def config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> ApproxModule:
        raise NotImplementedError

    @torch.no_grad()
    def dense_weight(self) -> Tensor | None:
        """Ŵ (out, in) in float32, by default by feeding the identity through forward."""
        if not self.is_linear:
            return None
        p = next(self.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        eye = torch.eye(self.in_features, device=device, dtype=dtype)
        zero = torch.zeros(1, self.in_features, device=device, dtype=dtype)
        return (self(eye) - self(zero)).t().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Approximator:
    """A method. Subclass and set ``name``, ``Params`` (a :class:`Params` model), ``module_class``
    and ``op`` (the backend op its modules run on, if any); implement :meth:`fit` and
    :meth:`estimate`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = Params
    module_class: ClassVar[type[ApproxModule]] = ApproxModule
    op: ClassVar[str | None] = None

    def needs_calibration(self, params: BaseModel) -> bool:
        """True when ``fit`` needs ``context.stats`` for these params."""
        return False

    def check(self, view: WeightView, params: BaseModel) -> None:
        """Raise ``ValueError`` when params cannot apply to this layer's shape (e.g. factor
        shapes that don't divide it). Called at plan time, before any computation."""

    def estimate(self, view: WeightView, params: BaseModel) -> Estimate:
        raise NotImplementedError

    def fit(self, view: WeightView, params: BaseModel, context: FitContext) -> ApproxModule:
        raise NotImplementedError

    def build(self, config: dict) -> ApproxModule:
        """An empty module from a saved ``config()``."""
        return self.module_class.from_config(config)
