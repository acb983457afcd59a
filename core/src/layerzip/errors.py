"""The exceptions layerzip raises on purpose. Each message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LayerzipError(Exception):
    """Base class of every error layerzip raises on purpose."""


class SpecError(LayerzipError, ValueError):
    """A spec (or a method's params) is malformed or names something that is not installed."""


class CompressionError(LayerzipError, RuntimeError):
    """Fitting or swapping a layer failed; the model has been restored to its original state."""


class CheckpointError(LayerzipError, ValueError):
    """A saved directory is missing, truncated, corrupted, or does not fit the given model."""


class PluginError(LayerzipError, RuntimeError):
    """Plugins clash (two register the same name) or a plugin is unusable."""


def close_spelling(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a choice is spelled close to word, else ''."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def installed_list(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(repr(n) for n in names) if names else "none"
