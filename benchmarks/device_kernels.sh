#!/usr/bin/env bash
# One device run for the 4-bit kernel routes (issue 10), from the repository root of a copy that carries
# .whl/ (gemlite's wheel, pydantic's wheels, gptqmodel's sdist; all git-ignored, never committed):
#   1. gemlite (and pydantic for the bench) installed into /tmp/site, no dependencies;
#   2. in the background, gptqmodel's Marlin bf16 ops JIT-built for sm_90a only (timeout 300, 12 jobs);
#   3. the CUDA tests of the kernel files; 4. benchmarks/kernel_routes.py (every route, every shape);
#   5. `colquant tune --force` and a short bench of the default path (gemlite switched off: not in `gpu`);
#   6. the Marlin route, if it built. Everything lands in $OUT (at most 8 files come back).
# Usage: bash benchmarks/device_kernels.sh [query batches] [page batches]
set -uo pipefail
qb=${1:-1,4,8,64}
pb=${2:-1}
source "$(dirname "$0")/device_setup.sh"
export COLQUANT_CACHE_DIR=/tmp/colquant-kernels
{ python3 -c "import gemlite; print('gemlite', gemlite.__version__)"
  nvcc --version | tail -2; } 2>&1 | tee -a "$log"
# Marlin: extracted under /tmp, built in the background while the GPU work runs
tar xzf .whl/gptqmodel-*.tar.gz -C /tmp && src=$(ls -d /tmp/gptqmodel-*/ | head -1)
(TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=12 timeout 300 python3 benchmarks/kernel_routes.py --build-marlin "$src" \
  --build-dir /tmp/marlin-build > /tmp/marlin-build.log 2>&1; echo "marlin build exit $?" >> /tmp/marlin-build.log) &
echo "== pytest (CUDA tests of the kernel files)" | tee -a "$log"
timeout 60 python3 -m pytest --noconftest tests/kernels/test_gemlite.py tests/kernels/test_autotune.py -q -rs \
  -p no:cacheprovider 2>&1 | tail -15 | tee -a "$log"
echo "== kernel_routes" | tee -a "$log"
timeout 150 python3 benchmarks/kernel_routes.py --gemlite-budget-s 90 --out "$out/kernel-routes.json" \
  > /tmp/routes.log 2>&1; echo "exit $?" >> /tmp/routes.log
grep -v " INFO " /tmp/routes.log | tail -60 | tee -a "$log"
# the default path (`.[gpu]`) has no gemlite: it won no bucket in kernel_routes and its autotuning took the
# whole budget of the previous run's tune (benchmarks/kernel-notes.md, "Kernel routes")
export COLQUANT_DISABLE_GEMLITE=1
echo "== tune --force" | tee -a "$log"
timeout 90 python3 -m colquant tune --force 2>&1 | tail -75 | tee -a "$log"
cp /tmp/colquant-kernels/*.json "$out/" 2>/dev/null  # the tuned table and gemlite's configs
echo "== bench" | tee -a "$log"
timeout 100 python3 -m colquant bench --profile synthetic-4b --precisions bf16,w4a16,w4a16-memory \
  --query-batches "$qb" --page-batches "$pb" --no-kernel-checks --out "$out/bench.json" 2>&1 | tail -40 | tee -a "$log"
echo "== marlin" | tee -a "$log"
tail -c 2500 /tmp/marlin-build.log | tee -a "$log"
lib=/tmp/marlin-build/gptqmodel_marlin_bf16.so
timeout 40 python3 benchmarks/kernel_routes.py --only bf16,marlin --marlin-lib "$lib" --marlin-src "$src" \
  --marlin-log /tmp/marlin-build.log --out "$out/kernel-routes-marlin.json" 2>&1 | grep -v " INFO " | tail -40 | tee -a "$log"
exit 0
