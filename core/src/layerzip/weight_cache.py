"""WeightCache: a kernel's own form of a module's weights (quantized, packed), built once.

Backends receive a module's parameters on every call. Some need them in another form first —
fp8 factors with their scales, a sparse matrix in a kernel's packed layout — which costs far
more than the call itself. A :class:`WeightCache` builds that form once per version of the
weights and hands it back on later calls.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor


class WeightCache:
    """``cache(*tensors, **params)`` returns ``build(*tensors, **params)``, rebuilt only when
    one of the tensors changes — another tensor object, storage, shape or dtype, or an
    in-place update (its ``_version``; ``load_state_dict`` and optimizer steps bump it) — or
    one of the (hashable) params does.

    Entries are keyed by the first tensor (the owner, e.g. a layer's weight) and hold a weak
    reference to it: an entry goes when its owner is collected, and a new tensor that reuses
    a dead one's id and address never gets the dead one's entry."""

    def __init__(self, build: Callable[..., Any]):
        self._build = build
        self._entries: dict[int, tuple] = {}

    @staticmethod
    def _key(tensors) -> tuple:
        return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
                     for t in tensors)

    def _lookup(self, owner: Tensor, others, params):
        """(key, entry if current else None)."""
        key = (self._key((owner, *others)), tuple(sorted(params.items())))
        hit = self._entries.get(id(owner))
        current = hit is not None and hit[0]() is owner and hit[1] == key
        return key, hit if current else None

    def __call__(self, owner: Tensor, *others: Tensor, **params) -> Any:
        key, hit = self._lookup(owner, others, params)
        if hit is None:
            ref = weakref.ref(owner, lambda _, k=id(owner), entries=self._entries:
                              entries.pop(k, None))
            hit = self._entries[id(owner)] = (ref, key, self._build(owner, *others, **params))
        return hit[2]

    def __len__(self) -> int:
        return len(self._entries)
