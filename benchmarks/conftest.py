"""Benchmark suite: collected only when pytest is pointed at benchmarks/ explicitly (the root
pyproject's testpaths leave it out). `--benchmark-disable` runs each case once as a smoke test."""

import pytest
import torch

from layerzip import bench


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["layerzip"] = bench.machine_info()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)

