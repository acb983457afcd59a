#!/usr/bin/env bash
# Runs on the lent GPU machine (through the device tool), from the repository root:
#   ../shared/device/prepare-wheels            # here, once: wheels the GPU image lacks
#   device run, carry [".whl"], command: "bash benchmarks/device_run.sh"
# SUITES, TESTS, NAME (the output stem) and REPORT (the report script) override what runs. Checks the kernels on the GPU first (the plugin tests), then the speed suites; JSON + logs go
# to $OUT. Bring them back into benchmarks/results/ and run benchmarks/report.py on them.
set -uo pipefail
source .whl/install.sh || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
LAYERZIP_TRITON_QUICK=1 python3 -m pytest ${TESTS:-tests/test_gpu.py plugins/lowrank/tests/test_triton_kernel.py \
  plugins/lowrank/tests/test_methods.py plugins/kronecker/tests} -q -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; tail -n 15 "$OUT/gpu_tests.log"
cd benchmarks
python3 -m pytest ${SUITES:-test_lowrank_speed.py test_lowrank_model.py test_kronecker_speed.py} -q -p no:cacheprovider \
  --benchmark-json="$OUT/${NAME:-lowrank_gpu}.json" \
  --benchmark-columns=median,rounds 2>&1 | tee "$OUT/bench.log" | tail -n 40
python3 ${REPORT:-report.py} "$OUT/${NAME:-lowrank_gpu}.json" --out "$OUT/${NAME:-lowrank_gpu}" | tail -n 60
