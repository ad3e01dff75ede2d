"""One of vLLM 0.26.0's compiled libraries, found and loaded into torch without importing vLLM.

Why: ``vllm_ops`` (Machete, Marlin, CUTLASS W4A8: ``vllm/_C_stable_libtorch.abi3.so``) and ``fa3_ops``
(FlashAttention-3: ``vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so``) each use one shared object of the same
release. Importing vllm pulls in its whole engine, so the package is only located and the file is
loaded with ``torch.ops.load_library``. Each library is declared once as data (:class:`VllmLibrary`)
and goes through the same checks, in the same order, with the same messages: switched off, not
installed, the wrong vllm release, a path that is not a file, the wrong torch or CUDA, a file that
fails to load or does not register the ops the wrapper calls.

A library is found at its environment variable (an explicit path: the GPU image, which cannot install
vLLM; see benchmarks/stage_vllm_lib.sh) or in the installed ``vllm`` package (``pip install
'colquant[vllm-kernels]'``, which pins the release).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["VLLM_VERSION", "TORCH_SERIES", "CUDA_MAJOR", "VllmLibrary", "installed_vllm_version",
           "environment_mismatch"]

VLLM_VERSION = "0.26.0"  # the release whose libraries the wrappers were written against (pyproject's extra pins it)
TORCH_SERIES = "2.11"  # vllm 0.26.0 requires torch==2.11.0
CUDA_MAJOR = "13"  # and is built for CUDA 13


@dataclass(frozen=True)
class VllmLibrary:
    """One shared object of the vllm package and what a wrapper needs of it."""

    relpath: str  # inside the vllm package
    env: str  # an explicit path to it
    disable_env: str  # set (not "0") to switch it off
    what: str  # "kernel library", "FlashAttention-3 library": for the messages
    namespace: str  # the torch.ops namespace it registers
    ops: tuple[str, ...]  # the ops the wrapper calls

    @property
    def install_hint(self) -> str:
        return (f"pip install 'colquant[vllm-kernels]' (vllm=={VLLM_VERSION}), or set {self.env} to the "
                f"vllm/{self.relpath} of vllm {VLLM_VERSION}")

    def path(self) -> Path | None:
        """The explicit path if set, else the installed vllm package's file, else None."""
        if os.environ.get(self.env):
            return Path(os.environ[self.env])
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / self.relpath

    def load_error(self) -> str | None:
        """None once the library is loaded into torch (loaded here); else a one-line reason naming
        what is needed. Callers cache it: a library loads once per process."""
        if os.environ.get(self.disable_env, "") not in ("", "0"):
            return f"vLLM's {self.what} disabled by {self.disable_env}"
        path = self.path()
        if path is None:
            return f"vLLM {VLLM_VERSION}'s {self.what} is not installed ({self.install_hint})"
        if not os.environ.get(self.env):
            installed = installed_vllm_version()
            if installed != VLLM_VERSION:
                return f"vllm {installed} is installed; colquant calls vllm {VLLM_VERSION}'s {self.what} ({self.install_hint})"
        if not path.is_file():
            state = "is a directory, not" if path.is_dir() else "does not exist: it must be"
            return f"{path} {state} vllm {VLLM_VERSION}'s {self.relpath} ({self.install_hint})"
        mismatch = environment_mismatch()
        if mismatch:
            return mismatch
        try:
            torch.ops.load_library(str(path))
        except Exception as exc:
            return (f"{path} failed to load ({type(exc).__name__}: {str(exc)[:200]}); it must be vllm "
                    f"{VLLM_VERSION}'s {self.relpath}")
        missing = [op for op in self.ops if not hasattr(getattr(torch.ops, self.namespace), op)]
        if missing:
            return (f"{path} registers no torch.ops.{self.namespace}.{', '.join(missing)}: not vllm "
                    f"{VLLM_VERSION}'s {self.relpath}")
        return None

    def release(self) -> str | None:
        """The release this library comes from (part of a tuned table's cache key): the installed vllm's,
        or for an explicit path the release it must be. Meaningful once `load_error()` is None."""
        return installed_vllm_version() if not os.environ.get(self.env) else f"{VLLM_VERSION} ({self.env})"


def installed_vllm_version() -> str | None:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def environment_mismatch() -> str | None:
    """Why this torch cannot load vLLM 0.26.0's libraries (None: it can)."""
    if not torch.__version__.startswith(TORCH_SERIES + "."):
        return (f"vLLM {VLLM_VERSION}'s kernels are built for torch {TORCH_SERIES} and this is torch "
                f"{torch.__version__}: use torch=={TORCH_SERIES}.0 (or a vllm release built for this torch)")
    cuda = torch.version.cuda
    if cuda is None or cuda.split(".")[0] != CUDA_MAJOR:
        return (f"vLLM {VLLM_VERSION}'s kernels are built for CUDA {CUDA_MAJOR} and this torch is built for "
                f"{'no CUDA (a CPU build)' if cuda is None else 'CUDA ' + cuda}: install a CUDA {CUDA_MAJOR} build "
                f"of torch {TORCH_SERIES}")
    return None
