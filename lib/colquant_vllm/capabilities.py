"""Which of vLLM's kernels this machine's vLLM build loads (the serving check's probe).

Run inside the serving environment: `python -m colquant_vllm.capabilities` prints JSON.

vLLM's CPU wheel ships three kernel libraries and loads one of them by the processor's features
(`CpuPlatform.import_kernels`: AVX512 with BF16, AVX512, or AVX2). The AVX2 library has no
`cpu_gemm_wna16`, the op vLLM's W4A16 linear layers call on a CPU, so on an AVX2-only processor the
engine dies on a 4-bit checkpoint while BF16 checkpoints serve fine. The probe asks vLLM to load its
kernels exactly as the engine will and reports which ops were registered, so the serving check
skips what this build cannot run (and says why) instead of guessing from CPU flags.
"""

from __future__ import annotations

import json

W4A16_CPU_OP = "cpu_gemm_wna16"


def probe() -> dict[str, object]:
    """{"device": vLLM's platform device type, "ops": {op name: registered}} after vLLM loads its kernels."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return {"device": current_platform.device_type, "ops": {W4A16_CPU_OP: hasattr(torch.ops._C, W4A16_CPU_OP)}}


if __name__ == "__main__":
    print(json.dumps(probe()))
