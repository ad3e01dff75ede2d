#!/usr/bin/env bash
# Real model bytes and quantization time of every default grid point at the 4B shapes (issue 27):
# benchmarks/frontier_grid.py on params/synthetic-4b.yaml (random weights), on the lent GPU.
# Usage (the wheels carried in .whl/, see benchmarks/device_setup.sh), in two runs that each fit 540 s:
#   bash benchmarks/device_frontier_grid.sh 470 rtn,seeds-rtn,autoscheme,fp8
#   bash benchmarks/device_frontier_grid.sh 470 autoround,seeds
# Writes $OUT/frontier-grid-synthetic-4b-<kinds>.json (rewritten after every point) and run.log; the
# table comes last. Copied to benchmarks/results/, the JSON files time the real profile's plan.
set -uo pipefail
budget_s=${1:-470}
kinds=${2:-rtn,seeds-rtn,autoscheme,autoround,fp8,seeds}
source benchmarks/device_setup.sh
export HF_DATASETS_OFFLINE=1 AR_LOG_LEVEL=WARNING TQDM_DISABLE=1
timeout 530 python3 benchmarks/frontier_grid.py params/synthetic-4b.yaml "$out" --budget-s "$budget_s" \
  --kinds "$kinds" 2>&1 | grep -v "it/s\]" | tee -a "$log" | tail -n 20
