#!/usr/bin/env bash
# Throughput scaling of `colquant encode-corpus` over 1, 2, 4 (8) GPUs: torchrun, one process per
# GPU, on the synthetic 4B (exact shapes, random weights) and a fixed set of synthetic pages of
# 1,280 visual tokens. Writes the logs and scale-encode-<gpu>.json to $OUT and prints a table.
# Usage (on a lent machine with several GPUs, from the repository root):
#   bash benchmarks/scale_encode.sh [pages=256] [size=4b] [batch=16] [shard=16]
# On a CPU (`size=tiny`) it runs the one-process case only, as a check of the script.
set -euo pipefail
pages=${1:-256}
size=${2:-4b}
batch=${3:-16}
shard=${4:-16}
out=${OUT:-/tmp/scale-encode-out}
work=${SCALE_WORK:-/tmp/scale-encode-work}
# NVLink multicast can take the host's shared GPUs out of service: keep it off in every process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# The same CPU threads per rank at every N (torchrun would give 1 thread only when N > 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/lib${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}
mkdir -p "$out" "$work"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null || true
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
"$python" benchmarks/scale_encode.py prepare "$work" --pages "$pages" --size "$size"
for n in 1 2 4 8; do
  [ "$n" -le "$(( gpus > 1 ? gpus : 1 ))" ] || break
  rm -rf "$work/index-$n"
  start=$(date +%s.%N)
  "$python" -m torch.distributed.run --standalone --nproc-per-node "$n" -m colquant encode-corpus \
    "$work/model" "$work/pages" "$work/index-$n" --batch-size "$batch" --shard-size "$shard" --no-progress \
    > "$out/scale-encode-n$n.log" 2>&1 || { tail -40 "$out/scale-encode-n$n.log"; exit 1; }
  echo "wall $start $(date +%s.%N)" >> "$out/scale-encode-n$n.log"
  grep -E "rank .*encoded" "$out/scale-encode-n$n.log"
done
"$python" benchmarks/scale_encode.py summarize "$work" "$out" --shard-size "$shard"
# Notebook 05's one-process split (threads, one model copy per GPU), when there are several GPUs.
if [ "$gpus" -gt 1 ]; then
  "$python" benchmarks/scale_encode.py replicas "$work" "$out" --pages "$(( pages < 128 ? pages : 128 ))" --batch-size "$batch"
fi
