"""What a notebook needs from the notebooks before it, checked up front when it runs on its own.

Opened directly in JupyterLab on an empty output root, notebooks 04-06 would otherwise fail deep
inside pandas (`No objects to concatenate`) or quietly evaluate only BF16. These checks say which
notebook, or which `colquant run` command, produces the missing inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from colquant.research import workspace

log = logging.getLogger(__name__)
PRODUCER = "03_quantization"
# The frontier's weight grid (`quantization.grid`) is measured where the frontier needs it: quality with
# every index setting (07), bytes and per-layer sensitivity (08). 04-06 compare the seeds' variants
# (auto-round per seqlen, RTN, FP8), which keeps a grid from multiplying the sweep and the mteb runs.
MEASURES_GRID = ("07_index_compression", "08_frontier")


class MissingInputError(RuntimeError):
    """A notebook's inputs do not exist yet; the message names the notebook and command that make them."""


def how_to_produce(profile: dict[str, Any], notebooks: str = "02,03") -> str:
    """The two ways to create quantized variants for this profile (01 describes the model only)."""
    return (
        f"run notebooks/02_calibration.ipynb then notebooks/{PRODUCER}.ipynb (once per calibration seqlen), "
        f"or `colquant run {profile['profile']} --notebooks {notebooks}`"
    )


def variants_to_compare(profile: dict[str, Any], notebook: str, *, need_quantized: bool) -> dict[str, Path]:
    """BF16 and every finished quantized variant the notebook compares (the grid's only in
    `MEASURES_GRID`), as `workspace.all_variants`, checked for emptiness.

    `need_quantized`: the notebook compares variants with BF16 (04) and cannot run without one;
    otherwise (05, 06) BF16 alone is a valid run, and a warning says the quantized rows are missing.
    """
    variants = workspace.all_variants(profile, grid=notebook in MEASURES_GRID)
    if len(variants) > 1:
        return variants
    where = workspace.variants_dir(profile)
    if need_quantized:
        raise MissingInputError(
            f"{notebook} compares quantized variants with BF16, and {where} holds none yet: {how_to_produce(profile)}"
        )
    log.warning(
        "%s found no quantized variant in %s and covers BF16 only; for the 4-bit rows %s",
        notebook, where, how_to_produce(profile),
    )
    return variants


def compression_results(profile: dict[str, Any], variants: Iterable[str]) -> pd.DataFrame:
    """Notebook 07's (variant, index setting) table, checked to cover every variant now compared:
    notebook 08 places exactly those pairs on the frontier."""
    from colquant.inference.compress import COMPRESSION_TABLE

    path = workspace.results_dir(profile) / COMPRESSION_TABLE
    command = f"run notebooks/07_index_compression.ipynb, or `colquant run {profile['profile']} --notebooks 07`"
    if not path.exists():
        raise MissingInputError(f"08_frontier places notebook 07's (variant, index setting) grid, and {path} does not "
                                f"exist yet: {command}")
    table = pd.read_csv(path)
    missing = sorted(set(variants) - set(table["variant"]))
    if missing:
        raise MissingInputError(f"{path} has no index results for {', '.join(missing)} (07 ran before they were made): "
                                f"{command}")
    return table
