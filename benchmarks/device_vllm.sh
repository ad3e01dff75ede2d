#!/usr/bin/env bash
# One device run for vLLM 0.26.0's Hopper kernels as tuner candidates (issue 24), from a folder holding this
# tree's lib/, tests/, benchmarks/ and params/, the carried wheels (WHEELS, default .whl: pydantic's) and
# vllm_C.so.xz (vllm 0.26.0's vllm/_C_stable_libtorch.abi3.so, xz-compressed to fit the 64 MiB transfer;
# extracted from the PyPI wheel, git-ignored, never committed):
#   1. the library decompressed under /tmp and named by COLQUANT_VLLM_OPS_LIB; what loads, which schedules;
#   2. the CUDA tests of kernels/vllm_ops.py and kernels/w4a8.py;  3. benchmarks/kernel_routes.py on the four text
#   shapes at the issue's token counts (BF16, the own-tensor 4-bit path, Machete's best schedule, Marlin, CUTLASS W4A8);
#   4. optionally (STEPS containing "bench") `colquant tune --force` and the bench, BF16 beside the 4-bit rows,
#   in what is left of TOTAL_S seconds (default 540).
# (PRECISIONS: the bench's precisions, default bf16,w4a16,w4a16-memory,w4a8; its whole output lands in $OUT/bench.log.)
# Usage: STEPS=probe,tests,routes,bench bash benchmarks/device_vllm.sh [query batches] [page batches]
set -uo pipefail
qb=${1:-1,4,8,64,1024}
pb=${2:-1,16}
steps=${STEPS:-probe,tests,routes}
precisions=${PRECISIONS:-bf16,w4a16,w4a16-memory,w4a8}
deadline=$((SECONDS + ${TOTAL_S:-540}))  # the whole run ends inside the device call's limit
left() { echo $((deadline - SECONDS)); }
source "$(dirname "$0")/device_setup.sh"
export COLQUANT_CACHE_DIR=/tmp/colquant-kernels COLQUANT_VLLM_OPS_LIB=/tmp/vllm/_C_stable_libtorch.abi3.so
mkdir -p /tmp/vllm && xz -d -T8 -c vllm_C.so.xz > "$COLQUANT_VLLM_OPS_LIB"
# the library links libcudart.so.13 by name: the folder of the one torch's CUDA wheels carry, in case none is loaded
cudart=$(python3 -c "import glob, os, torch; print(':'.join(sorted({os.path.dirname(p) for p in glob.glob(os.path.join(
  os.path.dirname(torch.__file__), '..', 'nvidia', '**', 'libcudart.so.13*'), recursive=True)})))")
export LD_LIBRARY_PATH=${cudart}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [[ $steps == *probe* ]]; then
  echo "== probe" | tee -a "$log"
  python3 -c "
import torch
from colquant.kernels import vllm_ops
print('load_error', vllm_ops.load_error(), 'capability', torch.cuda.get_device_capability())
for kind in vllm_ops.KINDS: print(kind, vllm_ops.unavailable_reason('cuda', kind))
s = vllm_ops.machete_schedules(); print(len(s), 'machete schedules:', ' '.join(s))" 2>&1 | tee -a "$log"
fi
if [[ $steps == *tests* ]]; then
  echo "== pytest tests/kernels/test_vllm_ops.py" | tee -a "$log"
  timeout 150 python3 -m pytest --noconftest tests/kernels/test_vllm_ops.py -q -rs -p no:cacheprovider 2>&1 \
    | tail -25 | tee -a "$log"
  echo "== pytest tests/kernels/test_w4a8.py" | tee -a "$log"
  # its test_load_* tests need the tiny W4A16 variant (conftest's fixture: auto-round); without auto-round, the rest
  if python3 -c "import auto_round" 2>/dev/null; then only=(); else only=(--noconftest -k "not test_load"); fi
  timeout 240 python3 -m pytest tests/kernels/test_w4a8.py "${only[@]}" -q -rs -p no:cacheprovider 2>&1 \
    | tail -25 | tee -a "$log"
fi
if [[ $steps == *routes* ]]; then
  echo "== kernel_routes" | tee -a "$log"
  timeout "${ROUTES_S:-300}" python3 benchmarks/kernel_routes.py --ms 1,42,168,336,1344,43008 \
    --only bf16,w4-own,machete,vllm-marlin,cutlass-w4a8 --out "$out/vllm-routes.json" > /tmp/routes.log 2>&1
  echo "exit $?" >> /tmp/routes.log
  grep -v " INFO " /tmp/routes.log | tail -40 | tee -a "$log"
fi
if [[ $steps == *bench* ]]; then
  echo "== tune --force" | tee -a "$log"
  timeout "$(( $(left) * 45 / 100 ))" python3 -m colquant tune --force 2>&1 | grep -v "off by" | tail -70 | tee -a "$log"
  cp /tmp/colquant-kernels/*.json "$out/" 2>/dev/null
  echo "== bench" | tee -a "$log"
  timeout "$(( $(left) - 5 ))" python3 -m colquant bench --profile synthetic-4b --precisions "$precisions" \
    --query-batches "$qb" --page-batches "$pb" --no-kernel-checks --out "$out/bench.json" > "$out/bench.log" 2>&1
  echo "exit $?" >> "$out/bench.log"
  grep -v -e "it/s\]" -e "s/it\]" "$out/bench.log" | tail -40 | tee -a "$log"
fi
exit 0
