#!/usr/bin/env bash
# One batched session on a lent GPU machine (see docs/benchmarks.md): build the extension
# against the machine's own torch, run the whole test suite with the CUDA tests enabled,
# compute-sanitizer (memcheck, racecheck) on the CUDA kernel tests, the bandwidth script and
# the pytest-benchmark suites on the GPU. Logs and JSON go to $OUT (default ./gpu_out). Run it
# from the repository root: bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.txt"

echo "== build"; start=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build took $(( $(date +%s) - start )) s"
$PY -c "import amaml_ext, json; print(json.dumps(amaml_ext.build_info()))" | tee -a "$OUT/env.txt"

echo "== pytest (all, CUDA enabled)"
$PY -m pytest python_tests -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -5

echo "== compute-sanitizer"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 99 $PY -m pytest python_tests/ops/test_ops.py -q -p no:cacheprovider \
    -k "cuda" > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool exit=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
done

echo "== bandwidth"
$PY -m benchmarks.gpu_bandwidth --out "$OUT/gpu_bandwidth.json" 2>&1 | tee "$OUT/gpu_bandwidth.md" | tail -25

echo "== pytest-benchmark (cuda)"
$PY -m pytest benchmarks -q -p no:cacheprovider -k cuda --benchmark-json="$OUT/bench_gpu.json" \
  --benchmark-columns=median,iqr,rounds > "$OUT/bench_gpu.log" 2>&1
tail -3 "$OUT/bench_gpu.log"
$PY -m benchmarks.summarize "$OUT/bench_gpu.json" > "$OUT/bench_gpu_summary.md" 2>&1; tail -30 "$OUT/bench_gpu_summary.md"
