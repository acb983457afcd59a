"""Matching module names and types against a rule's target patterns.

A pattern is one of:
- ``re:<regex>``: the regex must match the whole module name (``re.fullmatch``);
- a glob (contains ``*``, ``?`` or ``[``): ``fnmatch`` on the module name, where ``*`` also
  crosses dots (``*.mlp.*`` matches ``h.0.mlp.c_fc``);
- otherwise the exact module name, or a class name found in the module's MRO (``Linear``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Pattern:
    text: str

    @property
    def kind(self) -> str:
        if self.text.startswith("re:"):
            return "regex"
        if _GLOB_CHARS & set(self.text):
            return "glob"
        return "name"

    def matches(self, name: str, module: nn.Module) -> bool:
        kind = self.kind
        if kind == "regex":
            return _compile(self.text[3:]).fullmatch(name) is not None
        if kind == "glob":
            return fnmatch.fnmatchcase(name, self.text)
        return name == self.text or self.text in class_names(module)


@lru_cache(maxsize=1024)
def _compile(regex: str) -> re.Pattern:
    return re.compile(regex)


def check_pattern(text: str) -> str | None:
    """None if ``text`` is a usable pattern, else what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        return "a target pattern must be a non-empty string"
    if text != text.strip():
        return "a target pattern must not start or end with whitespace"
    if text.startswith("re:"):
        if not text[3:]:
            return "'re:' must be followed by a regular expression"
        try:
            re.compile(text[3:])
        except re.error as exc:
            return f"invalid regular expression {text[3:]!r}: {exc}"
    return None


def class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def matches_any(patterns, name: str, module: nn.Module) -> bool:
    return any(Pattern(p).matches(name, module) for p in patterns)
