"""The hook specifications plugins implement. Each is a collector: the plugin calls ``register``
once per thing it provides. A plugin module implements any subset of them::

    import layerzip

    @layerzip.hookimpl
    def register_approximators(register):
        register(MyMethod())
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("layerzip")
hookimpl = pluggy.HookimplMarker("layerzip")


@hookspec
def register_approximators(register):
    """Register methods. ``register(approximator)`` takes an instance of
    :class:`layerzip.Approximator` whose ``name`` is what specs call it (``method: svd``). Two
    plugins registering the same name is an error naming both."""


@hookspec
def register_pivot_strategies(register):
    """Register row/column selection rules. ``register(strategy)`` takes an instance of
    :class:`layerzip.PivotStrategy`; methods look them up with ``layerzip.get_pivot_strategy``."""


@hookspec
def register_backends(register):
    """Register kernels. ``register(backend)`` takes an instance of :class:`layerzip.Backend`,
    identified by ``(op, name)``. ``backend: auto`` in a spec picks the available backend of the
    method's op with the highest ``priority``."""


@hookspec
def register_layer_adapters(register):
    """Register layer types layerzip may replace. ``register(adapter)`` takes an instance of
    :class:`layerzip.LayerAdapter`. Adapters are asked in order of descending ``priority``; the
    first whose ``accepts(module)`` is true owns the module."""


@hookspec
def register_model_sources(register):
    """Register models the command line can load by name (``--model NAME``). ``register(source)``
    takes an instance of :class:`layerzip.ModelSource`; its ``name`` must not clash with a
    built-in model or another plugin's source. Meant for models whose layers are approximated
    while the model is built (compiled cirkit circuits), which own their ``plan`` and
    ``compress``."""
