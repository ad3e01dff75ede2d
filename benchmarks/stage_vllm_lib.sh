#!/usr/bin/env bash
# Stage vllm 0.26.0's compiled libraries for a GPU machine that cannot install packages (issue 24), on a machine
# with PyPI: download the wheel (no dependencies, Python 3.12, manylinux x86_64; 304 MB) into WHEEL_DIR (default
# .cache/vllm, git-ignored; not DIR, which travels to the device), extract one library and xz-compress it into DIR:
#   ops (default): vllm/_C_stable_libtorch.abi3.so (78.8 MB) -> DIR/vllm_C.so.xz (55.9 MB), for
#                  benchmarks/device_vllm.sh (COLQUANT_VLLM_OPS_LIB);
#   fa3:           vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so (153 MB) -> DIR/vllm_fa3.so.xz (about 11 MB), for
#                  benchmarks/device_fa3.sh (COLQUANT_VLLM_FA3_LIB).
# Each goes in its own DIR: the device's transfer is 64 MiB in all. DIR must be git-ignored; neither file is ever
# committed.
# Usage: bash benchmarks/stage_vllm_lib.sh DIR [ops|fa3]
set -euo pipefail
dir=${1:?usage: stage_vllm_lib.sh DIR [ops|fa3]}
case ${2:-ops} in
  ops) member=vllm/_C_stable_libtorch.abi3.so staged=vllm_C.so.xz ;;
  fa3) member=vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so staged=vllm_fa3.so.xz ;;
  *) echo "stage_vllm_lib.sh: the library is ops or fa3, not '$2'" >&2; exit 2 ;;
esac
wheels=${WHEEL_DIR:-.cache/vllm}
mkdir -p "$dir" "$wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" vllm==0.26.0
unzip -p "$wheels"/vllm-0.26.0-*.whl "$member" | xz -T2 -6 > "$dir/$staged"
ls -l "$dir/$staged"
