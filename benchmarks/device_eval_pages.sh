#!/usr/bin/env bash
# One device run for issue 26: where notebook 05's page time goes (benchmarks/eval_pages_profile.py): the mteb path
# (pages through mteb's dataloader as before, and stored pages decoded in the workers as now) against encode_pages on
# the same 2048x2560 document pages, batch 16, BF16 synthetic 4B; the per-page breakdown and a profiler trace; the
# saving of evaluating 3 LM-only variants together. From the tree's root, with the wheels the GPU image lacks in
# WHEELS (default .whl, ~49 MB): mteb and its needs, for Python 3.12 on manylinux x86_64. polars 1.33.1 is one wheel
# (40 MB); the lock's polars 2.2 needs polars-runtime-32 (52 MB), past the 64 MiB a call carries; mteb imports either:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl mteb==2.26.24 datasets==5.2.0 dill==0.4.1
#     multiprocess==0.70.19 polars==1.33.1 pytrec-eval-terrier==0.5.11 pydantic==2.14.4 pydantic-core==2.50.5
#     annotated-types==0.8.0 typing-inspection==0.4.5
# Then `colquant run params/colqwen3-4b.yaml --plan`: the real study's steps, work and estimated wall time on this GPU
# (the 4B's shapes with random weights in memory: the checkpoint is not downloaded there).
# Writes $OUT/eval-pages-profile.json, plan-colqwen3-4b.txt and run.log; prints the table last.
# Usage: bash benchmarks/device_eval_pages.sh [pages=96] [rounds=2]
set -uo pipefail
pages=${1:-96}
rounds=${2:-2}
source "$(dirname "$0")/device_setup.sh"
if ! python3 -c "import mteb, datasets" >> "$log" 2>&1; then
  echo "mteb or datasets does not import: carry their wheels in ${WHEELS:-.whl} (see this script's header)" | tee -a "$log"
  exit 1
fi
echo "== colquant run params/colqwen3-4b.yaml --plan" | tee -a "$log"
timeout "${PLAN_S:-170}" python3 -m colquant run params/colqwen3-4b.yaml --plan > "$out/plan-colqwen3-4b.txt" 2>&1
echo "exit $?" >> "$out/plan-colqwen3-4b.txt"
tail -5 "$out/plan-colqwen3-4b.txt" | tee -a "$log"
echo "== eval_pages_profile: $pages pages, $rounds rounds" | tee -a "$log"
timeout "${PROFILE_S:-340}" python3 benchmarks/eval_pages_profile.py --out "$out" --pages "$pages" --rounds "$rounds" \
  > "$out/eval-pages-profile.log" 2>&1
status=$?
echo "exit $status" >> "$out/eval-pages-profile.log"
grep -v -e "USDT:" -e "profiler_st" "$out/eval-pages-profile.log" | tail -16 | tee -a "$log"
exit $status
