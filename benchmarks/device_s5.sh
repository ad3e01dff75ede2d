#!/usr/bin/env bash
# H200 runs on merged main (session 5, issue 14). Steps, named as arguments (default: all):
#   tests      the CUDA tests of the kernels changed this session
#   breakdown  where a batch's GPU time goes (kernel_breakdown.py, BF16 and fp8-all)
#   gemm       BF16 vs FP8 GEMMs (precise and fast accumulation) at queries' and pages' token counts
#   bench      `colquant bench`: queries and pages, BF16 and the FP8 variants, each FP8 one with fast
#              (the default) and precise accumulation
# The default path: no environment variable, no optional kernel package (only pydantic is installed:
# the GPU image lacks it; carry its wheels in .whl/). Output in $OUT.
# Usage, from the repository root: bash benchmarks/device_s5.sh [step ...]
set -uo pipefail
source "$(dirname "$0")/device_setup.sh"

tests() {
  timeout 200 python3 -m pytest --noconftest tests/kernels/test_triton_ops.py tests/test_fp8_ops.py \
    tests/kernels/test_vision_ops.py tests/kernels/test_page_attention.py tests/kernels/test_fast_text_fp8.py \
    tests/kernels/test_query_graphs.py tests/test_fast_vision.py -q -rs -p no:cacheprovider 2>&1 | tail -15
}
breakdown() {
  (cd benchmarks && timeout 150 python3 kernel_breakdown.py --out "$out" --precisions bf16,fp8-all) \
    > "$out/kernel-breakdown.log" 2>&1; echo "exit $?" >> "$out/kernel-breakdown.log"
  tail -7 "$out/kernel-breakdown.log"
}
gemm() {
  timeout 150 python3 - "$out/gemm.json" <<'PY'
import json, sys
import torch
from colquant.kernels import fp8_ops
from colquant.retriever.model import ColQwen3Config
torch.backends.cuda.matmul.allow_tf32 = False
config = ColQwen3Config.colqwen3_4b()
shapes = fp8_ops.lm_shapes(config.text_config, (42, 20944, 43008)) + fp8_ops.vision_shapes(config.vision_config, (81920,))
rows = fp8_ops.gemm_comparison(shapes)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("| tower | layer | M | bf16 us | fp8 us | fp8 fast-accum us | bf16 TFLOP/s | fp8 TFLOP/s | fast/precise |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['tower']} | {r['layer']} | {r['M']} | {r['bf16_us']:.1f} | {r['fp8_gemm_us']:.1f} | {r['fp8_gemm_fast_accum_us']:.1f} | "
          f"{r['bf16_tflops']:.0f} | {r['fp8_gemm_tflops']:.0f} | {r['fp8_gemm_us'] / r['fp8_gemm_fast_accum_us']:.2f} |")
PY
}
bench() {
  python3 - <<'PY'
import yaml
p = yaml.safe_load(open("params/synthetic-4b.yaml"))
p["bench"].update(end_to_end_batches=0, reps=5)
yaml.safe_dump(p, open("/tmp/s5.yaml", "w"))
PY
  timeout 420 python3 -m colquant bench --profile /tmp/s5.yaml \
    --precisions bf16,fp8-lm,fp8-lm-precise,fp8-all,fp8-all-precise \
    --query-batches 1,64,1024 --page-batches 16 --vision fast --no-kernel-checks \
    --out "$out/bench.json" > "$out/bench.log" 2>&1; echo "exit $?" >> "$out/bench.log"
  grep -E "ms .* /s" "$out/bench.log" | tail -20
}
for step in "${@:-tests breakdown gemm bench}"; do
  for s in $step; do echo "== $s" | tee -a "$log"; "$s" 2>&1 | tee -a "$log"; done
done
exit 0
