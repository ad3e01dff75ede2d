"""Fast W4A16 (and BF16) inference for ColQwen3's text tower.

    from colquant.kernels import accelerate_model
    model = accelerate_model(model)          # 4-bit or bf16; CUDA graphs for queries

* :mod:`.packing`   auto_gptq <-> kernel layout (exact), auto-round-exact dequantization, RTN W4.
* :mod:`.linear`    :class:`W4A16Linear`, the token-count dispatcher, QuantLinear conversion.
* :mod:`.triton_gemm` the Triton W4A16 GEMMs; :mod:`.triton_ops` the other Triton kernels (both
  imported only where Triton is).
* :mod:`.tinygemm` torch core's 4-bit GEMM (``aten._weight_int4pack_mm``) as a candidate.
* :mod:`.humming_ops` humming-kernels (optional package) as a candidate.
* :mod:`.reference` their torch twins (CPU / no Triton / checks).
* :mod:`.fast_text` fused text-tower forward, CUDA-graph query path, :func:`accelerate_model`.
* :mod:`.autotune`  the candidate table and per-GPU tuning on first use (``python -m colquant tune``);
  :mod:`.tune_cache` its disk cache; :mod:`.copies` the weight copies a tuned table may ask for.
"""

from colquant.kernels.autotune import CANDIDATES, backend_report, ensure_tuned
from colquant.kernels.backend import fast_path_unavailable, use_fast_path
from colquant.kernels.copies import keep_copies, prepare_dispatch
from colquant.kernels.fast_text import (
    accelerate_model,
    find_text_model,
    fuse_text_model,
    offload_embeddings,
    reset_graphs,
    restore_embeddings,
)
from colquant.kernels.linear import (
    DISPATCH,
    W4A16Linear,
    force_reference,
    quantize_linears_rtn,
    replace_quant_linears,
)
from colquant.kernels.packing import (
    dequantize_gptq,
    dequantize_kernel,
    gptq_to_kernel,
    kernel_to_gptq,
    rtn_quantize_gptq,
)

__all__ = [
    "CANDIDATES",
    "ensure_tuned",
    "keep_copies",
    "prepare_dispatch",
    "DISPATCH",
    "W4A16Linear",
    "accelerate_model",
    "backend_report",
    "dequantize_gptq",
    "dequantize_kernel",
    "fast_path_unavailable",
    "find_text_model",
    "force_reference",
    "fuse_text_model",
    "gptq_to_kernel",
    "kernel_to_gptq",
    "offload_embeddings",
    "quantize_linears_rtn",
    "replace_quant_linears",
    "reset_graphs",
    "restore_embeddings",
    "rtn_quantize_gptq",
    "use_fast_path",
]
