#!/usr/bin/env bash
# One device run for the 4-bit kernels (issue 10): the CUDA kernel tests, a fresh per-GPU tuning
# (prints the table: every candidate's time is in the JSON), then the bench's default path with BF16
# and 4-bit side by side. Everything lands in $OUT (logs, tuned table, bench JSON).
# Usage on the lent GPU, from the repository root:
#   bash benchmarks/device_kernels.sh [query batches] [page batches] [bench seconds]
set -uo pipefail
qb=${1:-1,4,8,32,64,256}
pb=${2:-1,4}
bench_s=${3:-150}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=$PWD/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 COLQUANT_CACHE_DIR=/tmp/colquant-kernels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/env.log"
# the kernel tests that touch CUDA (the shared conftest needs packages the GPU image lacks)
timeout 90 python3 -m pytest --noconftest tests/kernels/test_linear.py tests/kernels/test_tinygemm.py tests/kernels/test_autotune.py tests/kernels/test_packing.py -q -rs -p no:cacheprovider 2>&1 | tail -25 | tee "$out/pytest-kernels.log"
timeout 150 python3 -m colquant tune --force 2>&1 | tee "$out/tune.log"
cp /tmp/colquant-kernels/*.json "$out/kernel-table.json" 2>/dev/null
timeout "$bench_s" python3 -m colquant bench --profile synthetic-4b --no-calibrate --query-batches "$qb" \
  --page-batches "$pb" --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
exit 0
