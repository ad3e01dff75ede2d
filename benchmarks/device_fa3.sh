#!/usr/bin/env bash
# One device run for FlashAttention-3's FP8 vision attention (issue 24), from the tree's root with the staging
# folder carried (FA3_DIR, default .fa3: vllm_fa3.so.xz from `bash benchmarks/stage_vllm_lib.sh .fa3 fa3`, and
# pydantic's wheels, which the GPU image lacks; git-ignored, never committed):
#   1. the library decompressed under /tmp and named by COLQUANT_VLLM_FA3_LIB; whether it loads, on which GPU;
#   2. the CUDA tests of the FA3 wrapper, the attention choice, the q/k/v producer and the fast vision tower;
#   3. benchmarks/fa3_attention_bench.py: one layer's attention at the 4B's page shapes, BF16 rope + cuDNN SDPA
#      against the FP8 producer + FA3 FP8 (µs, error against the BF16 result);
#   4. the bench's fp8-all pages at batch 16 from tensors, SDPA (FA3 switched off) then FA3, one process each;
# then a short table of 3 and 4. Everything lands in $OUT; the whole run ends inside TOTAL_S seconds (default 400).
# Usage, from the repository root: bash benchmarks/device_fa3.sh
set -uo pipefail
dir=${FA3_DIR:-.fa3}
deadline=$((SECONDS + ${TOTAL_S:-400}))
left() { echo $((deadline - SECONDS)); }
WHEELS=$dir source "$(dirname "$0")/device_setup.sh"
export COLQUANT_VLLM_FA3_LIB=/tmp/vllm/_vllm_fa3_C.abi3.so
mkdir -p /tmp/vllm && xz -d -T8 -c "$dir/vllm_fa3.so.xz" > "$COLQUANT_VLLM_FA3_LIB"
# the library links libcudart.so.13 by name: the folder of the one torch's CUDA wheels carry, in case none is loaded
cudart=$(python3 -c "import glob, os, torch; print(':'.join(sorted({os.path.dirname(p) for p in glob.glob(os.path.join(
  os.path.dirname(torch.__file__), '..', 'nvidia', '**', 'libcudart.so.13*'), recursive=True)})))")
export LD_LIBRARY_PATH=${cudart}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "== probe" | tee -a "$log"
python3 -c "
import torch
from colquant.kernels import fa3_ops
print('load_error', fa3_ops.load_error(), '| capability', torch.cuda.get_device_capability(),
      '| unavailable_reason', fa3_ops.unavailable_reason('cuda'))" 2>&1 | tee -a "$log"
echo "== pytest (CUDA tests)" | tee -a "$log"
timeout 120 python3 -m pytest --noconftest tests/kernels/test_fa3_ops.py tests/kernels/test_vision_attention.py \
  tests/kernels/test_vision_ops.py tests/test_fast_vision.py -q -rs -p no:cacheprovider > "$out/tests.log" 2>&1
tail -15 "$out/tests.log" | tee -a "$log"
echo "== attention microbench" | tee -a "$log"
timeout 90 python3 benchmarks/fa3_attention_bench.py --pages 4,16 --out "$out" > "$out/attention.log" 2>&1
echo "exit $?" >> "$out/attention.log"
tail -20 "$out/attention.log" > /tmp/attention-table.txt
cat /tmp/attention-table.txt >> "$log"
# the bench's profile with pages from tensors only (no PIL pipeline: the target row is "from tensors")
python3 -c "
import yaml
p = yaml.safe_load(open('params/synthetic-4b.yaml'))
p['bench'].update(end_to_end_batches=0)
yaml.safe_dump(p, open('/tmp/fa3-pages.yaml', 'w'))"
bench() {  # bench(label, share of the time left in %, environment...): fp8-all pages at 16 in its own process
  local label=$1 share=$2; shift 2
  echo "== bench fp8-all pages at 16: $label" | tee -a "$log"
  env "$@" timeout "$(( $(left) * share / 100 ))" python3 -m colquant bench --profile /tmp/fa3-pages.yaml \
    --precisions fp8-all --query-batches 1 --page-batches 16 --vision fast --no-kernel-checks \
    --out "$out/bench-fp8-all-$label.json" > "$out/bench-$label.log" 2>&1
  echo "exit $?" >> "$out/bench-$label.log"
  grep -E "attention|fp8-all +fast +page|exit" "$out/bench-$label.log" | tail -6 | tee -a "$log"
}
bench sdpa 55 COLQUANT_DISABLE_VLLM_FA3=1  # the first run also builds the synthetic 4B's weights
bench fa3 95 COLQUANT_DISABLE_VLLM_FA3=0
echo "== summary" | tee -a "$log"
{ cat /tmp/attention-table.txt
  for label in sdpa fa3; do
    grep -hE "fp8-all +fast +page " "$out/bench-$label.log" | sed "s/^/$label: /"
  done; } | tee -a "$log"
exit 0
