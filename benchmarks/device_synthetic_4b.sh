#!/usr/bin/env bash
# Run the pipeline at real scale (exact 4B shapes, random weights) on a GPU box with no network.
# Usage on the lent GPU (wheels carried in .whl/, see the device README):
#   bash benchmarks/device_synthetic_4b.sh 01,02,03      # quantization (issue: notebooks 01-03)
#   bash benchmarks/device_synthetic_4b.sh 04,06         # fidelity + memory/throughput sweep
# Results (executed notebooks, results/*.json|csv, REPORT.md, plots) are packed into $OUT.
set -uo pipefail
notebooks=${1:?notebook numbers, e.g. 01,02,03}
budget_s=${2:-540}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/lib
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 AR_LOG_LEVEL=WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "$budget_s" python3 -m colquant run params/synthetic-4b.yaml --notebooks "$notebooks"
status=$?
out=outputs/synthetic-4b
tar czf "${OUT:-/tmp}/synthetic-4b-${notebooks//,/-}.tgz" -C "$out" \
  --exclude=./base-model --exclude=./variants/*/model*.safetensors --exclude=./calibration --exclude=./corpus . 2>/dev/null
for meta in "$out"/variants/*/quantization_metadata.json; do
  [ -f "$meta" ] && python3 -c "import json,sys; m=json.load(open('$meta')); print(m['variant'], 'wall_s', m['wall_time_s'], 'peak_MiB', round(m['peak_memory_bytes']/2**20), m['memory_kind'], 'size_MiB', round(m['size_on_disk_bytes']/2**20))"
done
exit $status
