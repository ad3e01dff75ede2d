"""An older version of one of the repository's files, imported as a module of its own, so a benchmark
can time it beside the current one in one process (no copy of the old code is committed).

The source comes from `file` when given (the GPU machine's copy of the tree has no git), else from
`git show REF:PATH`, written to a temporary file: Triton reads a kernel's source from its file. The
module imports the rest of colquant from this checkout.
"""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def import_old(repo_path: str, *, ref: str = "main", file: Path | None = None, flag: str = "--old") -> ModuleType:
    """`repo_path` (e.g. "lib/colquant/kernels/fp8_ops.py") as it is in `file`, else at git `ref`."""
    if file is None:
        source = subprocess.run(["git", "show", f"{ref}:{repo_path}"], check=True, capture_output=True, text=True,
                                cwd=REPO).stdout
        with tempfile.NamedTemporaryFile("w", suffix=f"_old_{Path(repo_path).name}", delete=False) as handle:
            handle.write(source)
        file = Path(handle.name)
    spec = importlib.util.spec_from_file_location(f"old_{Path(repo_path).stem}", file)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot import the old {repo_path} from {file}: pass {flag} with {ref}'s copy of it")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
