"""layerzip: structured approximations of the weight-heavy layers of PyTorch models.

One call compresses a model by a declarative spec::

    import layerzip
    report = layerzip.compress(model, "spec.yaml", calibration=batches)
    layerzip.save(model, "out/")
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("layerzip")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

from .adapters import Conv1DAdapter, LayerAdapter, LinearAdapter
from .approximator import (
    Approximator,
    ApproxModule,
    Estimate,
    FitContext,
    LayerStats,
    Params,
)
from .backends import (Backend, MeasuredBackend, TritonKernelBackend, graph_capturing,
                       triton_interpreted)
from .calibration import call_model, collect_stats
from .checkpoint import load, load_record, read_manifest, save, save_record, write_atomic
from .errors import CheckpointError, CompressionError, LayerzipError, PluginError, SpecError
from .hookspecs import hookimpl
from .models import cache_dir
from .pivots import PivotStrategy
from .planning import Plan, PlannedLayer, plan
from .plugins import (
    Registry,
    get_approximator,
    get_backend,
    get_pivot_strategy,
    get_registry,
    reset_registry,
)
from .report import LayerRow, Report
from .sources import CompressOutcome, Metric, ModelSource
from .spec import Rule, Spec, json_schema, validate_params
from .triton_launch import LaunchCache, cdiv
from .views import DenseWeightView, WeightView
from .walker import compress
from .weight_cache import WeightCache

__all__ = [
    "Approximator", "ApproxModule", "Backend", "CheckpointError", "CompressOutcome",
    "CompressionError", "Metric", "ModelSource", "TritonKernelBackend", "triton_interpreted",
    "Conv1DAdapter", "DenseWeightView", "Estimate", "FitContext", "LayerAdapter", "LayerRow",
    "LaunchCache", "LayerStats", "LayerzipError", "LinearAdapter", "MeasuredBackend", "Params",
    "PivotStrategy", "Plan",
    "PlannedLayer", "PluginError", "Registry", "Report", "Rule", "Spec", "SpecError",
    "WeightView", "__version__", "cache_dir", "call_model", "cdiv", "collect_stats", "compress",
    "get_approximator",
    "get_backend", "get_pivot_strategy", "get_registry", "graph_capturing", "hookimpl",
    "json_schema", "load",
    "load_record", "plan", "read_manifest", "reset_registry", "save", "save_record",
    "validate_params", "WeightCache", "write_atomic",
]
