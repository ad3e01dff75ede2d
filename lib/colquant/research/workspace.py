"""Where a profile's inputs and results live, so notebooks, pipeline and report agree on paths.

Relative paths in a profile are relative to the repository root, whatever directory a notebook
runs in (JupyterLab starts in notebooks/, papermill in the root). `COLQUANT_OUTPUT_ROOT` moves all
outputs elsewhere: `make test-notebooks` uses it to run nbval against a fresh directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from colquant.retriever.checkpoint_files import METADATA_FILE, checkpoint_fingerprint, read_variant_metadata, variant_checkpoint
from colquant.basics.files import (  # noqa: F401  (re-exported: notebooks write through workspace)
    OUTPUT_ROOT_ENV,
    OutputError,
    atomic_directory,
    atomic_write,
    fingerprint,
    plain_mode,
    read_json,
    remove_stale_staging,
    write_csv,
    write_json,
    write_text,
    writing,
)

# The checkout: lib/ lies as many folders above this file as its module name has parts (colquant.research.workspace: 2)
REPO_ROOT = Path(__file__).resolve().parents[len(__name__.split("."))]
BASELINE = "bf16"
LOCK_FILE = ".colquant.lock"
# A profile name becomes a directory name: letters, digits, '.', '_', '-', not starting with a dot.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class OutputLockedError(OutputError):
    """Another live run holds the output directory."""


def resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def output_root() -> Path:
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or REPO_ROOT / "outputs")


def output_dir(profile: dict[str, Any]) -> Path:
    """`<output root>/<profile name>`; the name must be a plain name, so outputs stay under the root.

    A lookup: nothing is created here; whatever writes into it creates what it needs."""
    name = profile["profile"]
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise OutputError(
            f"profile name {name!r} is not a plain name (letters, digits, '.', '_', '-'; no '/', no '..', "
            f"not starting with '.'): it names the directory under {output_root()}, so rename the profile, "
            "e.g. 'tiny-nsamples4'")
    return output_root() / name


# --------------------------------------------------------------------------------------------
# Fingerprints: what a cached result depends on


def evaluation_fingerprint(profile: dict[str, Any], checkpoint: str | Path, scoring: str | None = None) -> str:
    """What a variant's retrieval scores depend on besides the task: weights, dtype, the
    visual-token budget and the scoring mode (the profile's, or `scoring` for the extra column
    notebook 05 adds). mteb files results under this as the revision."""
    model = profile["model"]
    return fingerprint(
        checkpoint_fingerprint(checkpoint), model["dtype"], model["max_num_visual_tokens"], scoring or profile["evaluation"]["scoring"]
    )


# --------------------------------------------------------------------------------------------
# One run per output directory


@contextmanager
def output_lock(directory: Path, *, wait_s: float = 0.0, poll_s: float = 1.0) -> Iterator[Path]:
    """Hold `directory/.colquant.lock` (naming pid, host and start time) for the duration.

    A second run on the same directory waits up to `wait_s` seconds (`math.inf`: until it is free),
    then refuses with the holder's details; a lock left by a dead process on this host is taken
    over. Something at the lock's path that no run wrote (not a JSON holder: binary, a list, a
    pid that is no process id, a folder) is refused the same way, naming what is wrong with it.
    """
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not wait_s >= 0:
        raise ValueError(f"wait_s={wait_s!r}: pass the seconds to wait for another run, >= 0 (0: refuse at once)")
    lock = Path(directory) / LOCK_FILE
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    deadline = time.monotonic() + wait_s
    while not _try_lock(lock, holder):
        current = _lock_holder(lock)
        if current is None:  # released between our attempt and the read: try again at once
            continue
        if isinstance(current, dict) and _is_stale(current):
            _remove_stale(lock, current)
            continue
        if time.monotonic() >= deadline:
            raise OutputLockedError(_lock_refusal(Path(directory), lock, current))
        time.sleep(poll_s)
    try:
        yield lock
    finally:
        if _lock_holder(lock) == holder:
            lock.unlink(missing_ok=True)


def _lock_refusal(directory: Path, lock: Path, current: dict[str, Any] | str) -> str:
    """Why `directory` cannot be taken: a live holder, or a lock file no run wrote, with the fix."""
    if isinstance(current, str):
        remove = "rm -r" if lock.is_dir() and not lock.is_symlink() else "rm"
        return (f"{directory} is locked by a file no colquant run wrote: {lock} is {current} (a run writes a JSON "
                f"object with its pid, host and start time). If no colquant run is using {directory}, remove it "
                f"({remove} {lock}) and rerun, or use another output directory ({OUTPUT_ROOT_ENV})")
    return (f"{directory} is in use by another run (pid {current['pid']} on {current['host']}, started "
            f"{current['started']}; lock file {lock}). Wait for it to finish, or use another output directory "
            f"({OUTPUT_ROOT_ENV}); if that process is gone on another machine, delete the lock file")


def _try_lock(lock: Path, holder: dict[str, Any]) -> bool:
    """Create the lock with its content in one step (write a temp file, hard-link it into place)."""
    with writing(lock):
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f"{lock.name}.", dir=lock.parent)
        try:
            os.fchmod(handle, plain_mode())  # readable as the results are, so others see who holds it
            with os.fdopen(handle, "w") as file:
                json.dump(holder, file)
            os.link(name, lock)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(name)


def _lock_holder(lock: Path) -> dict[str, Any] | str | None:
    """The holder a run wrote into `lock`; None when there is no lock; else what is wrong with the
    thing at its path (a run's lock is complete from the start: it is linked into place written)."""
    if lock.is_symlink():
        return "a symbolic link"
    if lock.is_dir():
        return "a folder"
    try:
        text = lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return "binary, not JSON text"
    except OSError as error:
        return f"not readable ({error.strerror})"
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return "empty" if not text.strip() else "not JSON"
    problem = _holder_problem(holder)
    return holder if problem is None else problem


def _holder_problem(holder: Any) -> str | None:
    """What keeps `holder` from being a run's {pid, host, started}, or None."""
    if not isinstance(holder, dict):
        return f"a JSON {type(holder).__name__}, not an object"
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
        return f"a holder whose pid {pid!r} is not a process id"
    if not all(isinstance(holder.get(key), str) for key in ("host", "started")):
        return "a holder without a host name and start time"
    return None


def _is_stale(holder: dict[str, Any]) -> bool:
    """Held by a process of this host that no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_stale(lock: Path, holder: dict[str, Any]) -> None:
    """Move the dead holder's lock aside (atomic), so two runs taking it over cannot both win."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _lock_holder(aside) != holder and not lock.exists():  # a live run took it over meanwhile
        os.rename(aside, lock)
    aside.unlink(missing_ok=True)


def corpus_dir(profile: dict[str, Any]) -> Path:
    return output_dir(profile) / "corpus"


def calibration_file(profile: dict[str, Any], seqlen: int) -> Path:
    """Where notebook 02 stores the set for `seqlen`. Its name carries a fingerprint of what the set
    is built from (the calibration settings and the model that tokenizes and embeds it), so a set
    built for other settings is never read in place of this one."""
    c = profile["calibration"]
    model = profile["model"]
    inputs = fingerprint({k: v for k, v in c.items() if k != "seqlens"}, seqlen, model["id"], model["revision"],
                         model["dtype"], profile["corpus"])
    return output_dir(profile) / "calibration" / f"{c['source']}-seqlen{seqlen}-n{c['nsamples']}-{inputs}.safetensors"


def variants_dir(profile: dict[str, Any]) -> Path:
    return output_dir(profile) / "variants"


def mteb_dir(profile: dict[str, Any]) -> Path:
    """mteb's result cache of notebook 05 (every variant on the evaluation tasks)."""
    return output_dir(profile) / "mteb"


def index_mteb_dir(profile: dict[str, Any]) -> Path:
    """mteb's result cache of notebook 07 (every variant with each compressed index), apart from
    05's: `--force` of one of them then replaces that notebook's results and no other's."""
    return output_dir(profile) / "mteb-index"


def embeddings_dir(profile: dict[str, Any]) -> Path:
    """The page and query embeddings notebooks 05 and 07 share (`colquant.evaluate.embedding_cache`)."""
    return output_dir(profile) / "embeddings"


def plots_dir(profile: dict[str, Any]) -> Path:
    """The figures' folder, created here because notebooks hand it to matplotlib's `savefig`,
    which does not create folders."""
    directory = output_dir(profile) / "plots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def base_model(profile: dict[str, Any]) -> Path:
    """The BF16 checkpoint directory: built locally for the embedded/synthetic profiles, otherwise
    the hub model (downloaded, or from the local cache; a clear CheckpointError when neither works)."""
    from colquant.retriever import tiny
    from colquant.retriever.checkpoint import resolve_checkpoint

    model = profile["model"]
    if model["id"] == "embedded-tiny":
        return tiny.build(output_dir(profile) / "base-model", size="tiny")
    if model["id"] == "synthetic-4b":
        return tiny.build(output_dir(profile) / "base-model", size="4b", device=model["device"])
    return resolve_checkpoint(model["id"], model["revision"])


def base_model_revision(profile: dict[str, Any]) -> str:
    """The hub commit the base model was read from (recorded with every result), or "local build"
    for the models this project builds itself; a hub id without a pinned `model.revision` reports
    the commit its cached snapshot holds."""
    from colquant.retriever.checkpoint import snapshot_revision

    if profile["model"]["id"] in ("embedded-tiny", "synthetic-4b"):
        return "local build"
    return snapshot_revision(base_model(profile)) or profile["model"]["revision"] or "unknown"


def calibration_source_used(profile: dict[str, Any], seqlen: int) -> str:
    """The source notebook 02 actually calibrated on at `seqlen` (its results JSON records it);
    before 02 has run, the requested source, which is what it uses unless the profile's offline
    fallback is taken. Variant names carry it."""
    record = results_dir(profile) / f"calibration__seqlen{seqlen}.json"
    if record.exists():
        return read_json(record, "delete it and re-run notebooks/02_calibration.ipynb")["source_used"]
    return profile["calibration"]["source"]


def autoround_variant(profile: dict[str, Any], seqlen: int) -> str:
    """The name of the auto-round variant at `seqlen`, with the calibration source used."""
    from colquant.research.params import quantization_section

    return quantization_section(profile).variant_name(seqlen, calibration_source=calibration_source_used(profile, seqlen))


def w4a8_seqlen(profile: dict[str, Any]) -> int | None:
    """The calibration seqlen whose auto-round variant also runs as W4A8 (`quantization.w4a8`): the one it
    names, the largest for `true`, None for `false`."""
    w4a8 = profile["quantization"]["w4a8"]
    if w4a8 is False:
        return None
    return max(profile["calibration"]["seqlens"]) if w4a8 is True else int(w4a8)


def w4a8_variant(profile: dict[str, Any], seqlen: int) -> str:
    """The name of the W4A8 run of the auto-round variant at `seqlen`."""
    from colquant.research.params import quantization_section

    return quantization_section(profile).w4a8_variant_name(seqlen, calibration_source=calibration_source_used(profile, seqlen))


def expected_variants(profile: dict[str, Any], *, grid: bool = True) -> list[str]:
    """The quantized variants the profile produces: auto-round per seqlen (ascending), then RTN, then FP8,
    then the W4A8 runs of auto-round variants, then (`grid`) the grid's points that are none of those
    (`weight_grid.grid_variants`)."""
    from colquant.quantize.fp8_variants import variant_names
    from colquant.research.params import quantization_section

    names = [autoround_variant(profile, seqlen) for seqlen in sorted(profile["calibration"]["seqlens"])]
    if profile["quantization"]["rtn_baseline"]:
        names.append(quantization_section(profile).variant_name(0, "rtn"))
    w4a8 = w4a8_seqlen(profile)
    names += variant_names(profile) + ([w4a8_variant(profile, w4a8)] if w4a8 is not None else [])
    return names + [name for name in grid_variant_names(profile) if grid and name not in names]


def grid_variant_names(profile: dict[str, Any]) -> list[str]:
    """The names of the grid's points (`quantization.grid`), with the calibration source used at its seqlen."""
    from colquant.quantize.weight_grid import grid_variants

    grid = profile["quantization"]["grid"]
    return [] if grid is None else list(grid_variants(profile, calibration_source_used(profile, grid["seqlen"])))


def quantized_variants(profile: dict[str, Any], *, grid: bool = True) -> dict[str, Path]:
    """Finished quantized checkpoints of this profile (metadata written), by variant name; `grid=False`
    leaves out the frontier grid's own points.

    Only variants the current profile produces count: a folder left by a seqlen since removed from
    the profile, or a staging folder (`.<name>.…`) of an interrupted save, is never compared.
    """
    directory = variants_dir(profile)
    finished = {}
    for name in expected_variants(profile, grid=grid):
        path = directory / name
        if (path / METADATA_FILE).exists():
            read_variant_metadata(path)  # a corrupt file is reported here, by path, with the fix
            finished[name] = path
    return finished


def all_variants(profile: dict[str, Any], *, grid: bool = True) -> dict[str, Path]:
    """BF16 first, then every quantized variant (`grid=False`: not the frontier grid's own points)."""
    return {BASELINE: base_model(profile), **quantized_variants(profile, grid=grid)}


def results_dir(profile: dict[str, Any]) -> Path:
    """Where notebooks write their JSON/CSV results (created by the first write)."""
    return output_dir(profile) / "results"


def load_variant(profile: dict[str, Any], path: str | Path, *, accelerate: bool | None = None) -> tuple[Any, Any]:
    """Load a variant (BF16, 4-bit, FP8, or a W4A8 run of a 4-bit one) with the profile's dtype, device and
    visual-token budget.

    `accelerate` as in `colquant.load` (default: the fused fast path on CUDA); pass False where
    code needs transformers' own decoder layers (per-layer hooks, auto-round's block replay).
    """
    from colquant.inference.loading import load

    model = profile["model"]
    checkpoint, options = variant_checkpoint(path)
    try:
        return load(checkpoint, dtype=model["dtype"], device=model["device"],
                    max_num_visual_tokens=model["max_num_visual_tokens"], accelerate=accelerate, **options)
    except RuntimeError as error:
        if not options:
            raise
        raise type(error)(f"{Path(path).name}: {error} (a W4A8 run this profile asks for in quantization.w4a8: set "
                          "quantization.w4a8: false to leave it out)") from error


def corpus(profile: dict[str, Any]) -> Any:
    """The embedded page corpus of the profile (built on first use; cached on disk)."""
    from colquant.evaluate.corpus import build_corpus

    c = profile["corpus"]
    return build_corpus(corpus_dir(profile), n_pages=c["n_pages"], n_queries=c["n_queries"], seed=c["seed"], progress=False)


def random_weights_notice(profile: dict[str, Any]) -> str:
    """The line every notebook and the report open with, so nobody mistakes the numbers' meaning."""
    if profile["random_weights"]:
        return (
            f"**Profile `{profile['profile']}`: random weights.** The model is randomly initialised, so "
            "every number here checks the machinery (shapes, formats, plumbing, costs), not retrieval quality."
        )
    return f"Profile `{profile['profile']}`: model `{profile['model']['id']}`."
