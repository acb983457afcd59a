#!/usr/bin/env bash
# The GPU measurements that session 8 (no device lent) left pending. A device call runs at most
# 600 s, so run the steps in two calls:
#   device run, carry [".whl"], command: "bash benchmarks/pending_gpu.sh 1 2"
#   device run, carry [".whl"], command: "bash benchmarks/pending_gpu.sh 3 4"
# Each step writes under $OUT; bring the files into benchmarks/results/ with the command that
# made them. Order: correctness on the GPU first, then the timings that decide defaults.
set -uo pipefail
source .whl/install.sh >/dev/null 2>&1 || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/benchmarks/results}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(1 2 3 4)
for STEP in "${steps[@]}"; do case $STEP in
1)
# 1. the session-8 kernels on the GPU: the residual gather kernels (both variants, bias,
#    overflow slices, graph capture), the decode kernel's vfirst order in dependent chains
LAYERZIP_TRITON_QUICK=1 timeout 300 python3 -m pytest -q -p no:cacheprovider \
  plugins/kronecker/tests core/tests/test_weight_cache.py plugins/lowrank/tests/test_decode_kernel.py \
  > "$OUT/gpu_tests_session8.log" 2>&1; tail -n 5 "$OUT/gpu_tests_session8.log" ;;
2)
# 2. the residual alone: gather kernel (x^T by torch / persistent) vs cuSPARSE, tile grid
timeout 240 python3 benchmarks/kronecker_entry_residual.py --out "$OUT/kronecker_entry_residual" \
  2>&1 | tail -n 30 ;;
3)
# 3. the whole Kronecker layer with a 1% residual (entries and blocks), torch vs triton
(cd benchmarks && timeout 300 python3 -m pytest test_kronecker_speed.py -k "res0.01" -q \
  -p no:cacheprovider --benchmark-json="$OUT/kronecker_gpu_residual.json" 2>&1 | tail -n 5)
python3 benchmarks/report.py "$OUT/kronecker_gpu_residual.json" --out "$OUT/kronecker_gpu_residual" \
  | tail -n 20 ;;
4)
# 4. decode: V tile first vs U tile first, default tiles, 4 and 8 warps, each timed twice
timeout 300 python3 benchmarks/lowrank_decode_tune.py --out "$OUT/lowrank_decode_tune_vfirst" \
  --grid '{"br": [64], "kc": [0], "bn": [0], "bk2": [0], "warps": [4, 8], "prefetch": [1],
           "pdl": [1], "split": [0], "tw": [0], "vfirst": [0, 1, 0, 1]}' 2>&1 | tail -n 20 ;;
*) echo "unknown step $STEP (1-4)" ;;
esac; done
