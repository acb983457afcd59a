#!/usr/bin/env bash
# The whole test suite (CPU): the benchmark suite once in smoke mode (each case runs once, so
# benchmarks never rot), then core, every plugin and the cross-package tests, with Triton kernels
# run through the interpreter. Extra arguments go to the main pytest run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
export TRITON_INTERPRET=1 PYTHONDONTWRITEBYTECODE=1
py="${LAYERZIP_VENV:-$root/.venv}/bin/python"
(cd benchmarks && "$py" -m pytest -q -p no:cacheprovider --benchmark-disable)
exec "$py" -m pytest "$@"
