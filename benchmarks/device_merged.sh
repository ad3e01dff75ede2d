#!/usr/bin/env bash
# One H200 run on merged main (session 4): the CUDA tests of the changed kernels, the default path's
# queries (BF16, W4A16, W4A16 memory-first = no BF16 copy + int8 embeddings), pages at batch 16 from
# tensors and from PIL through a warm PagePipeline (BF16, fp8-lm), and notebook 06's sweep timed beside
# the bench. No environment variable, no optional kernel package: only pydantic is installed (the GPU
# image lacks it; carry its wheels in .whl/). Everything lands in $OUT.
# Usage, from the repository root: bash benchmarks/device_merged.sh
set -uo pipefail
source "$(dirname "$0")/device_setup.sh"
profile() {  # profile(name, end_to_end_batches, reps): a copy of synthetic-4b with its bench section changed
  python3 - "$1" "$2" "$3" <<'PY'
import sys, yaml
name, e2e, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
p = yaml.safe_load(open("params/synthetic-4b.yaml"))
p["bench"].update(end_to_end_batches=e2e, reps=reps)
yaml.safe_dump(p, open(f"/tmp/{name}.yaml", "w"))
PY
}
echo "== pytest (CUDA tests of the changed kernels)" | tee -a "$log"
timeout 60 python3 -m pytest --noconftest tests/kernels/test_query_graphs.py tests/kernels/test_fast_text_fp8.py \
  tests/kernels/test_embedding.py -q -rs -p no:cacheprovider 2>&1 | tail -8 | tee -a "$log"
echo "== bench: queries, default path and memory-first" | tee -a "$log"
profile queries 0 5
timeout 170 python3 -m colquant bench --profile /tmp/queries.yaml --precisions bf16,w4a16,w4a16-memory \
  --query-batches 1,4,8,64,1024 --page-batches 1 --vision fast --no-kernel-checks \
  --out "$out/bench-queries.json" > "$out/bench-queries.log" 2>&1; echo "exit $?" >> "$out/bench-queries.log"
tail -30 "$out/bench-queries.log" | tee -a "$log"
echo "== bench: pages at batch 16, from tensors and from PIL" | tee -a "$log"
profile pages 12 3
timeout 190 python3 -m colquant bench --profile /tmp/pages.yaml --precisions bf16,fp8-lm \
  --query-batches 1 --page-batches 16 --vision fast --no-kernel-checks \
  --out "$out/bench-pages.json" > "$out/bench-pages.log" 2>&1; echo "exit $?" >> "$out/bench-pages.log"
tail -30 "$out/bench-pages.log" | tee -a "$log"
echo "== notebook 06's sweep beside the bench" | tee -a "$log"
timeout 150 python3 benchmarks/sweep_vs_bench.py --profile synthetic-4b --out "$out/sweep-vs-bench.json" \
  > "$out/sweep-vs-bench.log" 2>&1; echo "exit $?" >> "$out/sweep-vs-bench.log"
tail -25 "$out/sweep-vs-bench.log" | tee -a "$log"
exit 0
