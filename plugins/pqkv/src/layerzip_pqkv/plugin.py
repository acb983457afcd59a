"""Entry point of layerzip-pqkv."""

from __future__ import annotations

import layerzip

from .backends import FaissLookup, NanopqLookup, TorchLookup
from .method import PQKeyValue


@layerzip.hookimpl
def register_approximators(register):
    register(PQKeyValue())


@layerzip.hookimpl
def register_backends(register):
    register(TorchLookup())
    register(FaissLookup())
    register(NanopqLookup())
