#!/usr/bin/env bash
# The main job: compress the embedded SmolLM2-135M with the shipped default spec (whitened SVD,
# 20% of the block projections' parameters removed), print the report and perplexity before/after,
# save to ./layerzip-out. Extra arguments go to 'layerzip compress'.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
exec "${LAYERZIP_VENV:-$root/.venv}/bin/layerzip" compress "$@"
