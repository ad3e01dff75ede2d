"""Let torchvision's Python part import where its C++ extension cannot load (CPU-only serving).

PyPI's torchvision wheels for Linux are CUDA builds: on a machine with the CPU torch their `_C`
extension fails to load (it links libc10_cuda). vLLM needs only torchvision's Python transforms,
but `torchvision._meta_registrations` registers fake kernels for `torchvision::nms`/`qnms`
unconditionally, and torch 2.13 refuses that for operators that were never defined, so the whole
import fails. Defining the two operator schemas (no kernels: calling them still raises) lets the
import through. Must run before torchvision is first imported.
"""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)

SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: dropping the Library object would remove the definitions


def define_missing_torchvision_ops() -> bool:
    """Define torchvision's nms/qnms schemas when its extension cannot load; True if it did."""
    global _library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _library is not None:
        return False
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return False
    extension = next(iter(spec.submodule_search_locations)) + "/_C.so"
    try:
        torch.ops.load_library(extension)
        return False
    except OSError as error:
        log.info("torchvision's C++ ops do not load here (%s); defining nms/qnms schemas only", error.__cause__ or error)
    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS.values():
        _library.define(schema)
    return True
