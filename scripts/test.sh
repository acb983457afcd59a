#!/usr/bin/env bash
# The whole test suite (CPU): core, every plugin, cross-package tests, Triton kernels through the
# interpreter, and the benchmark suite once in smoke mode. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
export TRITON_INTERPRET=1 PYTHONDONTWRITEBYTECODE=1
exec "${LAYERZIP_VENV:-$root/.venv}/bin/python" -m pytest "$@"
