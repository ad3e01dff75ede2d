"""Variants that keep the same vision tower, evaluated together: the tower runs once per page batch.

W4A16 (auto-round at every seqlen, RTN) and fp8-lm quantize the language model only, so a page's
visual tokens and deepstack features are the same for them and for BF16: about 40% of a BF16 page's
GPU time is spent computing them again for each variant. Which variants share is decided by the
vision tower's weights as stored (`vision_fingerprint`), not by name: fp8-all, whose tower is FP8,
stands apart, and so does any variant whose tower differs by one bit.

`launch_shared_vision(models, batch, ...)` runs the first model's vision tower on a page batch once
and each model's language model on its output (transformers' `mm_encoder_outputs`), with the
multimodal positions `ColQwen3.forward` would compute: the same operations on the same numbers as
each model's own forward, so the same embeddings (tested bit for bit on the CPU). It needs the
models on one device.

Whether a group fits in memory is measured, not guessed (`MemoryCheck`): one page batch of the
evaluation's batch size at the full visual-token budget is run through the group's first model and
its peak memory recorded (CUDA's peak allocation; on a CPU the growth of the process's peak resident
memory); a further variant joins while, before loading it, the free memory holds its checkpoint's
bytes plus twice that peak (a batch being read back while the next one runs), and, once loaded,
still holds twice the peak with every weight copy its 4-bit kernel table asks for kept (otherwise it
would not compute as it does alone). A variant that does not fit is evaluated in the next group.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open

from colquant.retriever.encode import InFlight, model_device
from colquant.retriever.model import image_rope_positions
from colquant.retriever.weight_checks import shard_files

log = logging.getLogger(__name__)

VISION_TENSOR = re.compile(r"(?:^|\.)visual\.(.+)$")  # vision-tower tensors, whatever prefix the layout gives them
MEMORY_MARGIN = 2  # free memory kept per measured page-batch peak: one batch read back while the next runs
PROC_STATUS, PROC_CLEAR_REFS, PROC_MEMINFO = Path("/proc/self/status"), Path("/proc/self/clear_refs"), Path("/proc/meminfo")
# vision_fingerprint of checkpoints already read in this process, by their content fingerprint
_VISION_FINGERPRINTS: dict[str, str] = {}


@dataclass
class Companion:
    """A model evaluated together with another one's vision tower, and the cache its embeddings go to."""

    model: torch.nn.Module
    cache: Any  # embedding_cache.EmbeddingCache


def vision_fingerprint(checkpoint: str | Path) -> str:
    """sha256 over the vision tower's stored tensors (name within the tower, dtype, shape, bytes), read
    from the checkpoint's safetensors files without loading the model."""
    from colquant.retriever.checkpoint_files import checkpoint_fingerprint

    checkpoint = weights_folder(checkpoint)
    content = checkpoint_fingerprint(checkpoint)
    if content not in _VISION_FINGERPRINTS:
        tensors: dict[str, torch.Tensor] = {}
        for path in shard_files(checkpoint):
            with safe_open(str(path), framework="pt") as reader:
                tensors.update({match.group(1): reader.get_tensor(key) for key in reader.keys()
                                if (match := VISION_TENSOR.search(key))})
        if not tensors:
            raise ValueError(f"{checkpoint} holds no vision-tower tensors (no '...visual.*' key): not a ColQwen3 checkpoint")
        digest = hashlib.sha256()
        for name in sorted(tensors):
            tensor = tensors[name].contiguous()
            digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
        _VISION_FINGERPRINTS[content] = digest.hexdigest()
    return _VISION_FINGERPRINTS[content]


def sharing_groups(variants: Mapping[str, Path]) -> list[list[str]]:
    """The variants' names grouped by vision tower (equal `vision_fingerprint`), in the order of each
    group's first member, members in their given order."""
    groups: dict[str, list[str]] = {}
    for name, path in variants.items():
        groups.setdefault(vision_fingerprint(path), []).append(name)
    return list(groups.values())


def launch_shared_vision(models: Sequence[torch.nn.Module], batch: dict[str, torch.Tensor], indices: list[int],
                         device: torch.device) -> list[InFlight]:
    """Queue a page batch through `models[0]`'s vision tower once, then through every model's language
    model (and projection), each model's embeddings on their way to the host (as `encode._launch`)."""
    first = models[0]
    with torch.inference_mode():
        inputs = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        vision = first.vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                    return_dict=True, use_cache=False)
        positions = image_rope_positions(inputs["mm_token_type_ids"], inputs["attention_mask"], inputs["image_grid_thw"],
                                         first.config.vision_config.spatial_merge_size)
        language_inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
        launched = []
        for model in models:
            embeddings = model(**language_inputs, position_ids=positions,
                               mm_encoder_outputs={"image": vision}).embeddings.to("cpu", non_blocking=True)
            arrived = None
            if device.type == "cuda":
                arrived = torch.cuda.Event()
                arrived.record()
            launched.append(InFlight(indices, batch["attention_mask"].bool(), embeddings, arrived))
    return launched


def check_shareable(models: Sequence[torch.nn.Module]) -> None:
    """Refuse models the shared forward cannot serve: on several devices, or masking non-image tokens
    (`ColQwen3.forward` masks them only when it is given the pixels)."""
    devices = {model_device(model) for model in models}
    if len(devices) > 1:
        raise ValueError(f"models sharing a vision tower must be on one device, got {sorted(map(str, devices))}")
    if any(model.config.mask_non_image_embeddings for model in models):
        raise ValueError("a model with mask_non_image_embeddings cannot take another model's vision output: "
                         "evaluate it alone")


# --------------------------------------------------------------------------------------------
# Memory: whether one more variant fits beside those loaded


class MemoryCheck:
    """Whether one more variant fits on `device` beside those loaded (see the module's rule).

    `measure(model, processor, batch_size)` records the peak of one full-budget page batch on the
    group's first model; `before_loading(checkpoint)` and `after_loading(model)` return why a
    further variant cannot join (None: it can)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reserve = 0

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        """Why memory cannot be measured on `device` (None: it can)."""
        if device.type == "cuda":
            from colquant.inference.distributed import visible_gpus

            gpus = visible_gpus()
            return (f"{len(gpus)} GPUs are visible: each variant's pages are spread over all of them instead"
                    if len(gpus) > 1 else None)
        if not (PROC_STATUS.is_file() and PROC_MEMINFO.is_file() and PROC_CLEAR_REFS.exists()):
            return "the process's peak memory cannot be read here (no /proc): variants are evaluated one by one"
        if _malloc_trim() is None:
            return ("the C library has no malloc_trim, so memory it keeps after earlier work would hide a batch's "
                    "peak: variants are evaluated one by one")
        return None

    def measure(self, model: torch.nn.Module, processor: Any, batch_size: int) -> int:
        """Run one batch of `batch_size` pages at the processor's full visual-token budget through
        `model`; the reserve becomes MEMORY_MARGIN times its peak memory. Returns the peak."""
        side = int(math.isqrt(processor.max_pixels) // processor.patch_factor * processor.patch_factor)
        pages = processor.process_images([Image.new("RGB", (side, side), "white")] * batch_size)
        inputs = {key: value.to(self.device) for key, value in pages.items()}
        with torch.inference_mode():
            peak = self._peak_of(lambda: model(**inputs))
        self.reserve = MEMORY_MARGIN * peak
        return peak

    def _peak_of(self, run: Any) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            run()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        _malloc_trim()(0)  # hand freed heap back first: a batch served from it would not raise the resident size
        before = _proc_kib(PROC_STATUS, "VmRSS")
        PROC_CLEAR_REFS.write_text("5")  # resets the peak resident size (VmHWM) to the current one
        run()
        return max(0, _proc_kib(PROC_STATUS, "VmHWM") - before) * 1024

    def free(self) -> int:
        """Free bytes now. A variant joins only where more than its need is free: on a CPU the measured peak can
        be 0 (the allocator reuses pages freed earlier without growing the resident size), and nothing free is
        never room."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return _proc_kib(PROC_MEMINFO, "MemAvailable") * 1024

    def before_loading(self, checkpoint: Path) -> str | None:
        need = checkpoint_bytes(checkpoint) + self.reserve
        free = self.free()
        return None if free > need else (f"its {checkpoint_bytes(checkpoint) / 2**30:.2f} GiB of weights and "
                                          f"{self.reserve / 2**30:.2f} GiB for page batches do not fit in the "
                                          f"{free / 2**30:.2f} GiB free")

    def after_loading(self, model: torch.nn.Module) -> str | None:
        missing = copies_missing(model)
        if missing:
            return f"{missing} of its 4-bit layers lack the weight copy their kernel table asks for (memory)"
        free = self.free()
        return None if free > self.reserve else (f"loaded, it leaves {free / 2**30:.2f} GiB free, under the "
                                                  f"{self.reserve / 2**30:.2f} GiB its page batches need")


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS). Why: after a larger batch,
    glibc keeps the freed memory and serves the next batch from it, so that batch's peak resident size
    would read as no increase at all (measured: 0 bytes for a second 2-page batch after an 8-page one)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return None


def _proc_kib(path: Path, field: str) -> int:
    line = next(line for line in path.read_text().splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1])


def weights_folder(variant: str | Path) -> Path:
    """The folder holding a variant's weights: itself, or for a W4A8 run (a folder naming a 4-bit checkpoint,
    `checkpoint_files.variant_checkpoint`) that checkpoint, whose vision tower and weight bytes it runs."""
    from colquant.retriever.checkpoint_files import variant_checkpoint

    return variant_checkpoint(variant)[0]


def checkpoint_bytes(checkpoint: Path) -> int:
    """The bytes of a checkpoint's weight files: what loading it puts in memory, before any copy."""
    return sum(path.stat().st_size for path in shard_files(weights_folder(checkpoint)))


def copies_missing(model: torch.nn.Module) -> int:
    """4-bit layers lacking a weight copy (BF16, tinygemm, gemlite) their tuned kernel table asks for:
    such a layer runs another kernel than it would with memory to spare, so other numbers."""
    from colquant.kernels.copies import wanted_copies
    from colquant.kernels.linear import W4A16Linear

    layers = [module for module in model.modules() if isinstance(module, W4A16Linear)]
    missing = 0
    for kind in ("bf16", "tinygemm", "gemlite"):
        wanted = wanted_copies(model, kind) if layers else {}
        missing += sum(1 for layer in layers if (shape := (layer.in_features, layer.out_features)) in wanted
                       and not layer.has_copy(kind, wanted[shape]))
    return missing
