#!/usr/bin/env bash
# One H200 run for the page batch's non-GEMM work (session 5, issue 14), same machine, one call:
#   1. the CUDA tests of the changed kernels (page attention layout, vision add+LayerNorm, fast vision tower);
#   2. kernel_breakdown.py (bf16, fp8-all; 16 pages) on the branch's base (a copy of main in $BASE), then on this
#      branch (pages and queries), so the two breakdowns come from one run.
# Usage, from this branch's copy: BASE=../.dev-pages-base bash benchmarks/device_pages.sh  (pydantic wheels in ../.whl)
set -uo pipefail
base=$(cd "${BASE:?BASE names a copy of the base commit}" && pwd)
WHEELS=${WHEELS:-../.whl} source "$(dirname "$0")/device_setup.sh"
echo "== pytest (CUDA tests of the changed kernels)" | tee -a "$log"
PYTHONPATH=/tmp/site:$PWD/lib timeout 75 python3 -m pytest --noconftest tests/kernels/test_page_attention.py \
  tests/kernels/test_vision_ops.py tests/kernels/test_triton_ops.py tests/test_fast_vision.py -q -rs \
  -p no:cacheprovider > "$out/tests.log" 2>&1
tail -8 "$out/tests.log" | tee -a "$log"
breakdown() {  # $1: label, $2: repository copy, rest: kernel_breakdown arguments
  local label=$1 root=$2; shift 2
  echo "== kernel breakdown: $label" | tee -a "$log"
  (cd "$root/benchmarks" && PYTHONPATH=/tmp/site:$root/lib timeout 100 python3 kernel_breakdown.py \
    --out "$out/$label" --precisions bf16,fp8-all "$@") > "$out/$label.log" 2>&1; echo "exit $?" >> "$out/$label.log"
  tail -6 "$out/$label.log" | tee -a "$log"
}
breakdown base "$base" --query-batch 0
breakdown pages "$PWD"
exit 0
