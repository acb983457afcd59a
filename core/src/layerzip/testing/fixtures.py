"""pytest fixtures shipped with layerzip (loaded through the ``pytest11`` entry point)."""

from __future__ import annotations

import pytest

from ..plugins import get_registry


@pytest.fixture
def register_plugin():
    """Call ``register_plugin(obj, name=None)`` to register a plugin for this test only."""
    reg = get_registry()
    names = []

    def register(plugin, name=None):
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        info = reg.add(plugin, name)
        names.append(name)
        return info

    yield register
    for name in names:
        reg.remove(name)
