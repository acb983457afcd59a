"""Backend: one kernel for one factorized op, and how ``backend: auto`` picks among them."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor


class Backend:
    """A kernel for ``op``. Subclass, set ``op``, ``name``, ``priority`` and implement
    ``__call__`` with the op's signature (the plugin defining the op documents it)."""

    op: ClassVar[str] = ""
    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    description: ClassVar[str] = ""
    #: True for the op's plain reference kernel: what modules fall back to for inputs their
    #: chosen backend declines, and what kernels are tested against.
    reference: ClassVar[bool] = False

    def available(self) -> tuple[bool, str]:
        """(True, "") when usable on this machine, else (False, why — e.g. what to install)."""
        return True, ""

    def supports(self, x: Tensor) -> bool:
        """Whether this kernel handles this input (device, dtype, shape). A module whose backend
        declines an input falls back to the op's reference backend."""
        return True

    def __call__(self, *args, **kwargs):
        raise NotImplementedError
