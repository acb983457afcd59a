"""Entry point of layerzip-lowrank: registers the methods and the lowrank_matmul backends."""

from __future__ import annotations

import layerzip

from .backends import (
    CompileBackend,
    FP8Backend,
    LowRankMeasuredBackend,
    SplitKBackend,
    TensorRTBackend,
    TorchBackend,
    TritonBackend,
    TritonDecodeBackend,
)
from .methods import Adaptive, Rsvd, Svd


@layerzip.hookimpl
def register_approximators(register):
    register(Svd())
    register(Rsvd())
    register(Adaptive())


@layerzip.hookimpl
def register_backends(register):
    register(TorchBackend())
    register(CompileBackend())
    register(FP8Backend())
    register(TensorRTBackend())
    register(TritonBackend())
    register(SplitKBackend())
    register(TritonDecodeBackend())
    register(LowRankMeasuredBackend())
