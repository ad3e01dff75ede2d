# Sourced by the benchmarks/device_*.sh run scripts (from the tree's root on the GPU machine): sets
# $out (= $OUT) and $log, offline unbuffered Python, installs the carried wheels (pydantic: the GPU
# image lacks it; WHEELS names their folder, default .whl) under /tmp/site, puts them and this tree's
# lib on PYTHONPATH, and writes the GPU and library versions at the top of the log.
out=${OUT:-/tmp/out}
mkdir -p "$out"
log="$out/run.log"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --target /tmp/site "${WHEELS:-.whl}"/*.whl 2>&1 | tail -3 | tee -a "$log"
export PYTHONPATH=/tmp/site:$PWD/lib
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"
