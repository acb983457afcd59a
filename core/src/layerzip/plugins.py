"""The plugin manager and the registry of everything plugins provide.

Entry points of group ``layerzip`` are loaded one at a time: a plugin that fails to import or to
register is recorded with its error (``layerzip plugins`` shows it) and never stops the others.
``LAYERZIP_PLUGINS=a,b`` loads only those entry points (an empty value loads none).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .adapters import Conv1DAdapter, LayerAdapter, LinearAdapter
from .approximator import Approximator
from .backends import Backend
from .errors import PluginError, SpecError, close_spelling, installed_list
from .models import BUILTINS
from .pivots import PivotStrategy
from .sources import ModelSource

ENTRY_POINT_GROUP = "layerzip"
CORE = "layerzip"


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    provides: dict[str, list[str]] = field(default_factory=dict)


class _CorePlugin:
    """The core registers its own adapters through the same hook as everyone else."""

    @hookspecs.hookimpl
    def register_layer_adapters(self, register):
        register(LinearAdapter())
        register(Conv1DAdapter())


_KINDS = {
    "register_approximators": ("approximators", Approximator),
    "register_pivot_strategies": ("pivot_strategies", PivotStrategy),
    "register_backends": ("backends", Backend),
    "register_layer_adapters": ("layer_adapters", LayerAdapter),
    "register_model_sources": ("model_sources", ModelSource),
}


class Registry:
    """What the loaded plugins provide, with who provided each thing."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("layerzip")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.approximators: dict[str, tuple[Approximator, str]] = {}
        self.pivot_strategies: dict[str, tuple[PivotStrategy, str]] = {}
        self.backends: dict[tuple[str, str], tuple[Backend, str]] = {}
        self.layer_adapters: list[tuple[LayerAdapter, str]] = []
        self.model_sources: dict[str, tuple[ModelSource, str]] = {}

    # -- loading -----------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        allow = os.environ.get("LAYERZIP_PLUGINS")
        allowed = None if allow is None else {a.strip() for a in allow.split(",") if a.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None)
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                info.error = f"import failed: {type(exc).__name__}: {exc}"
                self.plugins[ep.name] = info
                continue
            self.add(obj, ep.name, info=info)

    def add(self, plugin: object, name: str, *, info: PluginInfo | None = None) -> PluginInfo:
        """Register one plugin (a module or object with hookimpls) and collect what it provides.
        On any failure nothing it registered is kept, and the error is recorded in its info."""
        if name in self.plugins and self.plugins[name].error is None:
            raise PluginError(f"a plugin named {name!r} is already registered")
        info = info or PluginInfo(name)
        snapshot = self._snapshot()
        try:
            self.pm.register(plugin, name=name)
            for hook_name, (kind, _) in _KINDS.items():
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin_name == name:
                        impl.function(register=self._registrar(kind, name, info))
        except Exception as exc:
            self._restore(snapshot)
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            if isinstance(exc, PluginError):
                info.error = str(exc)
            else:
                tb = traceback.extract_tb(exc.__traceback__)[-1]
                info.error = (f"registration failed: {type(exc).__name__}: {exc} "
                              f"({os.path.basename(tb.filename)}:{tb.lineno})")
            info.provides = {}
        self.plugins[name] = info
        return info

    def remove(self, name: str) -> None:
        """Unregister a plugin and everything it provided."""
        self.approximators = {k: v for k, v in self.approximators.items() if v[1] != name}
        self.pivot_strategies = {k: v for k, v in self.pivot_strategies.items() if v[1] != name}
        self.backends = {k: v for k, v in self.backends.items() if v[1] != name}
        self.layer_adapters = [v for v in self.layer_adapters if v[1] != name]
        self.model_sources = {k: v for k, v in self.model_sources.items() if v[1] != name}
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.plugins.pop(name, None)

    def _snapshot(self):
        return (dict(self.approximators), dict(self.pivot_strategies), dict(self.backends),
                list(self.layer_adapters), dict(self.model_sources))

    def _restore(self, snap) -> None:
        (self.approximators, self.pivot_strategies, self.backends, self.layer_adapters,
         self.model_sources) = snap

    def _registrar(self, kind: str, plugin_name: str, info: PluginInfo):
        base = next(b for k, b in _KINDS.values() if k == kind)

        def register(obj) -> None:
            if not isinstance(obj, base):
                raise PluginError(f"plugin {plugin_name!r} registered {obj!r} as one of its "
                                  f"{kind}, but it is not a layerzip.{base.__name__}")
            if kind == "layer_adapters":
                self.layer_adapters.append((obj, plugin_name))
                self.layer_adapters.sort(key=lambda t: -t[0].priority)
                label = obj.name or type(obj).__name__
            else:
                if not obj.name:
                    raise PluginError(f"plugin {plugin_name!r} registered a {base.__name__} "
                                      "with an empty name")
                key = (obj.op, obj.name) if kind == "backends" else obj.name
                if kind == "model_sources" and obj.name in BUILTINS:
                    raise PluginError(f"plugin {plugin_name!r} registered model source "
                                      f"{obj.name!r}, which is a built-in model name")
                table = getattr(self, kind)
                if key in table:
                    other = table[key][1]
                    raise PluginError(
                        f"{base.__name__} {key!r} is registered by both plugin {other!r} and "
                        f"plugin {plugin_name!r}; uninstall one, or limit loading with "
                        f"LAYERZIP_PLUGINS")
                table[key] = (obj, plugin_name)
                label = f"{obj.op}:{obj.name}" if kind == "backends" else obj.name
            info.provides.setdefault(kind, []).append(label)

        return register

    # -- lookups -----------------------------------------------------------------------------
    def approximator(self, name: str) -> Approximator:
        if name not in self.approximators:
            raise SpecError(f"unknown method {name!r}{close_spelling(name, self.approximators)}; "
                            f"installed methods: {installed_list(self.approximators)}")
        return self.approximators[name][0]

    def pivot_strategy(self, name: str) -> PivotStrategy:
        if name not in self.pivot_strategies:
            raise SpecError(
                f"unknown pivot strategy {name!r}{close_spelling(name, self.pivot_strategies)}; "
                f"installed: {installed_list(self.pivot_strategies)}")
        return self.pivot_strategies[name][0]

    def backends_for(self, op: str) -> list[Backend]:
        found = [b for (o, _), (b, _) in self.backends.items() if o == op]
        return sorted(found, key=lambda b: -b.priority)

    def backend(self, op: str, name: str = "auto") -> Backend:
        """The backend ``name`` of ``op``; ``auto`` is the available one of highest priority."""
        candidates = self.backends_for(op)
        if name == "auto":
            for b in candidates:
                if b.available()[0]:
                    return b
            raise SpecError(f"no available backend for op {op!r}: "
                            + ("; ".join(f"{b.name}: {b.available()[1]}" for b in candidates)
                               or "none is installed"))
        if (op, name) not in self.backends:
            names = [b.name for b in candidates]
            raise SpecError(f"unknown backend {name!r} for op {op!r}{close_spelling(name, names)};"
                            f" installed: {installed_list(names + ['auto'])}")
        backend = self.backends[(op, name)][0]
        ok, why = backend.available()
        if not ok:
            raise SpecError(f"backend {name!r} for op {op!r} is not available here: {why}")
        return backend

    def reference_backend(self, op: str) -> Backend:
        """The backend of ``op`` marked ``reference`` (else its lowest-priority available one)."""
        candidates = [b for b in reversed(self.backends_for(op)) if b.available()[0]]
        for b in candidates:
            if b.reference:
                return b
        if candidates:
            return candidates[0]
        raise SpecError(f"no available backend for op {op!r}")

    def adapter_for(self, module) -> LayerAdapter | None:
        for adapter, _ in self.layer_adapters:
            if adapter.accepts(module):
                return adapter
        return None

    def model_source(self, name: str) -> ModelSource | None:
        entry = self.model_sources.get(name)
        return entry[0] if entry else None

    def plugin_of(self, method: str) -> PluginInfo | None:
        entry = self.approximators.get(method)
        return self.plugins.get(entry[1]) if entry else None


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use from the installed entry points."""
    global _registry
    if _registry is None:
        reg = Registry()
        reg.add(_CorePlugin(), CORE,
                info=PluginInfo(CORE, "layerzip", _version("layerzip")))
        reg.load_entry_points()
        _registry = reg
    return _registry


def reset_registry() -> None:
    """Forget the registry; the next :func:`get_registry` reloads the entry points."""
    global _registry
    _registry = None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def get_approximator(name: str) -> Approximator:
    return get_registry().approximator(name)


def get_pivot_strategy(name: str) -> PivotStrategy:
    return get_registry().pivot_strategy(name)


def get_backend(op: str, name: str = "auto") -> Backend:
    return get_registry().backend(op, name)

