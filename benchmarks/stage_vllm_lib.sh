#!/usr/bin/env bash
# Stage vllm 0.26.0's op library for a GPU machine that cannot install packages (issue 24), on a machine with
# PyPI: download the wheel (no dependencies, Python 3.12, manylinux x86_64; 304 MB) into WHEEL_DIR (default
# .cache/vllm, git-ignored; not DIR, which travels to the device), extract
# vllm/_C_stable_libtorch.abi3.so (78.8 MB) and xz-compress it to DIR/vllm_C.so.xz (55.9 MB: under the device's
# 64 MiB transfer). DIR must be git-ignored; neither file is ever committed. benchmarks/device_vllm.sh, run
# from a folder holding vllm_C.so.xz, decompresses it and names it in COLQUANT_VLLM_OPS_LIB.
# Usage: bash benchmarks/stage_vllm_lib.sh DIR
set -euo pipefail
dir=${1:?usage: stage_vllm_lib.sh DIR}
wheels=${WHEEL_DIR:-.cache/vllm}
mkdir -p "$dir" "$wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" vllm==0.26.0
unzip -p "$wheels"/vllm-0.26.0-*.whl vllm/_C_stable_libtorch.abi3.so | xz -T2 -6 > "$dir/vllm_C.so.xz"
ls -l "$dir/vllm_C.so.xz"
