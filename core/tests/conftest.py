import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import toy_plugin  # noqa: E402

from layerzip.testing import registered_plugin  # noqa: E402


@pytest.fixture
def toy():
    """The test-only 'toy_lowrank' method, registered for one test."""
    toy_plugin.ToyApproximator.calls = 0
    toy_plugin.ToyApproximator.seen_stats = []
    with registered_plugin(toy_plugin, "toy"):
        yield toy_plugin
