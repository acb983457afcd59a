"""LayerAdapter: which module types layerzip may replace, how to view their weight, how to swap.

The core registers adapters for ``torch.nn.Linear`` and transformers' GPT-2 ``Conv1D`` (which
stores W transposed, as (in, out)). Plugins register adapters for other layer families.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .views import DenseWeightView, WeightView


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class LayerAdapter:
    """Recognizes one family of layers. Subclass and override :meth:`accepts` and :meth:`view`;
    override :meth:`replace` when a plain attribute swap is not how the layer is put in place."""

    name: str = ""
    priority: int = 0

    def accepts(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def view(self, module: nn.Module) -> WeightView:
        raise NotImplementedError

    def layer_input(self, args: tuple, kwargs: dict):
        """The tensor the layer multiplies by W, from a forward-hook's (args, kwargs). Calibration
        statistics are gathered on it."""
        return args[0] if args else next(iter(kwargs.values()))

    def replace(self, model: nn.Module, name: str, new: nn.Module) -> Callable[[], None]:
        """Put ``new`` in place of the module called ``name``; return a function that undoes it."""
        parent, attr = _parent_and_attr(model, name)
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        return lambda: setattr(parent, attr, old)


class LinearAdapter(LayerAdapter):
    name = "linear"

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def view(self, module: nn.Module) -> WeightView:
        return DenseWeightView(module.weight, module.bias)


class Conv1DAdapter(LayerAdapter):
    """transformers' GPT-2 ``Conv1D``: y = x @ weight + bias with weight stored (in, out)."""

    name = "gpt2-conv1d"

    def accepts(self, module: nn.Module) -> bool:
        # Matched by class name so the core never imports transformers unless it is installed.
        return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
                   for c in type(module).__mro__)

    def view(self, module: nn.Module) -> WeightView:
        return DenseWeightView(module.weight, module.bias, transposed=True)
