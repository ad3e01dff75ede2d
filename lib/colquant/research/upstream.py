"""What a notebook needs from the notebooks before it, checked up front when it runs on its own.

Opened directly in JupyterLab on an empty output root, notebooks 04-06 would otherwise fail deep
inside pandas (`No objects to concatenate`) or quietly evaluate only BF16. These checks say which
notebook, or which `colquant run` command, produces the missing inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from colquant.research import workspace

log = logging.getLogger(__name__)
PRODUCER = "03_quantization"


class MissingInputError(RuntimeError):
    """A notebook's inputs do not exist yet; the message names the notebook and command that make them."""


def how_to_produce(profile: dict[str, Any], notebooks: str = "02,03") -> str:
    """The two ways to create quantized variants for this profile (01 describes the model only)."""
    return (
        f"run notebooks/02_calibration.ipynb then notebooks/{PRODUCER}.ipynb (once per calibration seqlen), "
        f"or `colquant run {profile['profile']} --notebooks {notebooks}`"
    )


def variants_to_compare(profile: dict[str, Any], notebook: str, *, need_quantized: bool) -> dict[str, Path]:
    """BF16 and every finished quantized variant, as `workspace.all_variants`, checked for emptiness.

    `need_quantized`: the notebook compares variants with BF16 (04) and cannot run without one;
    otherwise (05, 06) BF16 alone is a valid run, and a warning says the quantized rows are missing.
    """
    variants = workspace.all_variants(profile)
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
