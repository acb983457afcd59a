"""Report: what compress did, a row per layer plus totals; a rich table and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from rich.table import Table


@dataclass
class LayerRow:
    name: str
    layer_type: str
    method: str
    backend: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    flops_before: int
    flops_after: int
    weight_error: float | None
    output_error: float | None
    fit_seconds: float
    details: dict = field(default_factory=dict)


@dataclass
class Report:
    rows: list[LayerRow] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    #: "holdout" when output errors were measured on held-out inputs, "calibration" when on the
    #: calibration inputs themselves (in-sample), None when no inputs were given.
    output_error_on: str | None = None
    extra: dict = field(default_factory=dict)

    def totals(self) -> dict:
        def s(attr):
            return sum(getattr(r, attr) for r in self.rows)

        return {
            "layers": len(self.rows),
            "params_before": s("params_before"), "params_after": s("params_after"),
            "bytes_before": s("bytes_before"), "bytes_after": s("bytes_after"),
            "flops_per_token_before": s("flops_before"), "flops_per_token_after": s("flops_after"),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "fit_seconds": round(s("fit_seconds"), 3),
        }

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "totals": self.totals(),
                "output_error_on": self.output_error_on, "extra": self.extra}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_table(self, max_rows: int | None = None) -> Table:
        t = Table(title="layerzip report")
        heads = ["layer", "type", "method", "backend", "params", "params after", "FLOPs after",
                 "weight err", f"output err ({self.output_error_on or 'n/a'})", "fit s"]
        for h in heads:
            t.add_column(h, justify="left" if h in ("layer", "type", "method", "backend")
                         else "right")
        rows = self.rows if max_rows is None or len(self.rows) <= max_rows else \
            self.rows[: max_rows // 2] + [None] + self.rows[-(max_rows // 2):]
        for r in rows:
            if r is None:
                t.add_row(f"… {len(self.rows) - 2 * (max_rows // 2)} more", *[""] * 9)
                continue
            t.add_row(r.name, r.layer_type, r.method, r.backend, f"{r.params_before:,}",
                      f"{r.params_after:,}", f"{r.flops_after / max(r.flops_before, 1):.1%}",
                      _fmt(r.weight_error), _fmt(r.output_error), f"{r.fit_seconds:.2f}")
        tot = self.totals()
        t.add_section()
        ratio = tot["params_after"] / max(tot["params_before"], 1)
        t.add_row(f"{tot['layers']} layers", "", "", "", f"{tot['params_before']:,}",
                  f"{tot['params_after']:,} ({ratio:.1%})",
                  f"{tot['flops_per_token_after'] / max(tot['flops_per_token_before'], 1):.1%}",
                  "", "", f"{tot['fit_seconds']:.1f}")
        t.caption = (f"model parameters: {self.model_params_before:,} → "
                     f"{self.model_params_after:,} "
                     f"({self.model_params_after / max(self.model_params_before, 1):.1%})")
        return t


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"
