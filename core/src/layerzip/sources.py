"""ModelSource: a model a plugin teaches the command line (``layerzip plan|compress --model NAME``).

The built-in models (causal LMs) are compressed by the walker: load, swap layers, measure
perplexity. Some models cannot be edited after they are built — a compiled cirkit circuit keeps
its layers in an address book, so a swapped module is never called — and are approximated while
they are built instead. A source owns that: its ``plan`` and ``compress`` read the same spec
format (rules, targets, validated params) and return the core's :class:`~layerzip.Plan` and
:class:`~layerzip.Report`, so the command line prints them like any other model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .report import Report

if TYPE_CHECKING:  # planning imports the registry, which imports this module
    from .planning import Plan


@dataclass
class Metric:
    """One quality or speed figure of the model before and after compression."""

    name: str
    before: float | None
    after: float | None
    #: how to read it: "lower" or "higher" is better, or "" when neither (e.g. a checksum)
    better: str = "lower"


@dataclass
class CompressOutcome:
    """What :meth:`ModelSource.compress` did: the per-layer report, the model-level metrics
    measured on held-out data, where the result was saved, and free-form notes."""

    report: Report
    metrics: list[Metric] = field(default_factory=list)
    saved: Path | None = None
    notes: list[str] = field(default_factory=list)


class ModelSource:
    """A named model for ``--model``. Subclass, set ``name`` and ``description``, implement
    :meth:`plan` and :meth:`compress`; register with the ``register_model_sources`` hook."""

    name: str = ""
    description: str = ""

    def default_spec(self) -> str | Path | dict | None:
        """The spec used when the command line is given none (None: the caller must give one)."""
        return None

    def plan(self, spec) -> Plan:
        """Which layer gets which method with which params, and the estimated cost — no fitting.
        Bad specs raise :class:`~layerzip.SpecError` naming the rule and the field."""
        raise NotImplementedError

    def compress(self, spec, out: str | Path | None, *, progress: bool | None = None
                 ) -> CompressOutcome:
        """Build the model with the spec's approximations, measure it against the exact model on
        held-out data, save it under ``out`` (when given) and say what was done. All or nothing:
        a failure leaves nothing half-written under ``out``."""
        raise NotImplementedError
