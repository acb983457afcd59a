"""The declarative spec: ordered rules saying which method goes to which layers with which params.

Parsing (shape, types, patterns) happens in :class:`Spec`; checking the spec against what is
installed (methods, their params, backends) happens in :func:`resolve`. Every problem becomes a
:class:`~layerzip.SpecError` naming the rule, the field, the bad value, what is installed and a
close spelling if there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic import field_validator

from .approximator import Approximator
from .errors import SpecError, close_spelling, installed_list
from .matching import check_pattern
from .plugins import Registry, get_registry


class Rule(BaseModel):
    """One rule. ``targets``/``ignore`` take exact names, globs, ``re:<regex>`` (fullmatch) or
    class names; ``ignore`` always wins; the first rule that matches a layer wins."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(min_length=1)
    ignore: list[str] = Field(default_factory=list)
    method: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    backend: str = Field(default="auto", min_length=1)

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            problem = check_pattern(p)
            if problem:
                raise ValueError(f"{problem} (got {p!r})")
        return v


class Spec(BaseModel):
    """``rules`` in priority order; ``strict`` makes a rule that matches no layer an error (else
    a warning); ``seed`` seeds every randomized method."""

    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(min_length=1)
    strict: bool = True
    seed: int = 0

    @classmethod
    def parse(cls, source: Spec | dict | str | Path) -> Spec:
        """A Spec from a Spec, a dict, a path to a .yaml/.yml/.json file, or YAML/JSON text."""
        if isinstance(source, Spec):
            return source
        origin = "spec"
        if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                        and source.strip().endswith((".yaml", ".yml", ".json"))):
            path = Path(source)
            if not path.is_file():
                raise SpecError(f"spec file {str(path)!r} does not exist")
            origin, source = str(path), path.read_text(encoding="utf-8")
        if isinstance(source, str):
            try:
                source = yaml.safe_load(source)  # YAML is a superset of JSON
            except yaml.YAMLError as exc:
                raise SpecError(f"{origin}: not valid YAML/JSON: {exc}") from None
        if not isinstance(source, dict):
            raise SpecError(f"{origin}: a spec must be a mapping with a 'rules' list, got "
                            f"{type(source).__name__}")
        try:
            return cls.model_validate(source)
        except ValidationError as exc:
            raise SpecError(f"{origin}: " + describe_validation_error(exc, cls)) from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def describe_validation_error(exc: ValidationError, model: type[BaseModel] | None = None,
                              prefix: str = "") -> str:
    """A pydantic ValidationError as readable lines: where, what, the bad value, a spelling."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        where = _loc(loc, prefix)
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and model is not None:
            allowed = _allowed_fields(model, loc[:-1])
            msg = (f"unknown field {loc[-1]!r}{close_spelling(str(loc[-1]), allowed)}; "
                   f"allowed fields: {installed_list(allowed)}")
        elif err["type"] != "missing":
            msg += f" (got {err.get('input')!r})"
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)


def _loc(loc: list, prefix: str) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _allowed_fields(model: type[BaseModel], loc: list) -> list[str]:
    # Walk the location through nested models to the one that owns the unknown key.
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        inner = getattr(ann, "__args__", (ann,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)),
                     model)
    return list(model.model_fields)


@dataclass(frozen=True)
class ResolvedRule:
    index: int
    rule: Rule
    approximator: Approximator
    params: BaseModel
    backend: str

    @property
    def label(self) -> str:
        return f"rule {self.index} (method {self.rule.method!r})"


def validate_params(approximator: Approximator, params: dict, where: str = "params") -> BaseModel:
    try:
        return approximator.Params.model_validate(params)
    except ValidationError as exc:
        fields = list(approximator.Params.model_fields)
        raise SpecError(f"{describe_validation_error(exc, approximator.Params, where)}; "
                        f"params of {approximator.name!r}: {installed_list(fields)}") from None


def resolve(spec: Spec, registry: Registry | None = None) -> list[ResolvedRule]:
    """Check every rule against the installed plugins; the resolved rules, in order."""
    registry = registry or get_registry()
    out = []
    for i, rule in enumerate(spec.rules):
        try:
            approximator = registry.approximator(rule.method)
        except SpecError as exc:
            raise SpecError(f"rule {i}, field 'method': {exc}") from None
        params = validate_params(approximator, rule.params, f"rule {i}, params")
        backend = rule.backend
        if approximator.op is None:
            if backend != "auto":
                raise SpecError(f"rule {i}, field 'backend': method {rule.method!r} has no "
                                f"selectable backends; remove 'backend' or use 'auto'")
        else:
            try:
                registry.backend(approximator.op, backend)
            except SpecError as exc:
                raise SpecError(f"rule {i}, field 'backend': {exc}") from None
        out.append(ResolvedRule(i, rule, approximator, params, backend))
    return out


def json_schema(registry: Registry | None = None) -> dict:
    """JSON Schema of a spec for the installed methods: ``params`` is checked per ``method``."""
    registry = registry or get_registry()
    variants = []
    for name, (approximator, _) in sorted(registry.approximators.items()):
        variants.append(create_model(
            f"Rule_{name}", __base__=Rule,
            method=(Literal[name], Field(description=approximator.description or name)),
            params=(approximator.Params, Field(default_factory=dict)),
        ))
    if variants:
        rule_type = (Annotated[Union[tuple(variants)], Field(discriminator="method")]  # noqa: UP007
                     if len(variants) > 1 else variants[0])
        spec_model = create_model("LayerzipSpec", __base__=Spec,
                                  rules=(list[rule_type], Field(min_length=1)))
    else:
        spec_model = Spec
    schema = TypeAdapter(spec_model).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "layerzip spec"
    return schema


def dump_json_schema(path: str | Path, registry: Registry | None = None) -> None:
    Path(path).write_text(json.dumps(json_schema(registry), indent=2) + "\n", encoding="utf-8")
