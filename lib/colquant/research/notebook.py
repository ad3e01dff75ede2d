"""What every notebook does first, in one call, and the helpers its result cells share.

`nb = colquant.research.notebook.setup(profile_path)` replaces the setup cell each notebook used to repeat:
quiet library logging, plot and table styling, seeds, the profile, its output folders, the palette
that gives each variant one colour in every figure, and the random-weights notice shown at the top.
`nb.show(figure, stem)` saves a figure under `plots/` (with the random-weights note when the
profile has random weights) and displays it; `nb.record(metric, values)` writes a named metric
(`colquant.evaluate.metrics`) that REPORT.md and the tests read. The sentences that interpret each result
live in `colquant.research.interpret`, beside nothing else, so the notebooks stay a methods section.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import seaborn as sns
from IPython.display import Image, Markdown, display
from matplotlib.figure import Figure

from colquant.evaluate import metrics
from colquant.evaluate.plots import BASELINE, mark_random_weights, variant_palette
from colquant.research import workspace
from colquant.research.params import load_profile

# Libraries whose INFO logs and warnings would fill executed notebooks (and vary between runs).
QUIET_LOGGERS = ("autoround", "transformers", "datasets", "huggingface_hub", "mteb", "matplotlib", "PIL")
# auto-round and transformers set their loggers' levels from these when first imported (after setup),
# so the environment is where to quiet them; a value the user set is kept.
QUIET_ENVIRONMENT = {"AR_LOG_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error"}


@dataclass(frozen=True)
class Notebook:
    """A notebook's profile and where it writes, with the helpers that keep figures and metrics uniform."""

    profile: dict[str, Any]
    results: Path
    plots: Path

    @property
    def random_weights(self) -> bool:
        return bool(self.profile["random_weights"])

    def palette(self, variants: Iterable[str] = ()) -> dict[str, Any]:
        """Colours for BF16, every variant the profile produces and any other `variants` shown
        (e.g. a variant kind the profile does not name), the same in every figure of the run."""
        return variant_palette([BASELINE, *workspace.expected_variants(self.profile), *variants])

    def show(self, figure: Figure, stem: str) -> None:
        """Mark, save (atomically, as `plots/<stem>.png`) and display a figure, once.

        Figures built with `matplotlib.figure.Figure` (not pyplot) do not display themselves at
        the end of a cell; this displays every figure the same way, as the PNG it saved. It returns
        nothing, so a cell that ends with it does not display the figure a second time as its value.
        """
        mark_random_weights(figure, self.random_weights)
        path = workspace.atomic_write(self.plots / f"{stem}.png",
                                      lambda staging: figure.savefig(staging, format="png", bbox_inches="tight"))
        # the saved file, not the figure object: a Figure made without pyplot has no PNG formatter
        # until pyplot's inline backend is loaded, and would display as "<Figure size ...>"
        display(Image(filename=str(path)))
        plt.close(figure)  # a pyplot figure would otherwise be displayed a second time at the cell's end

    def record(self, metric: metrics.Metric, values: Mapping[Any, Any] | float | None) -> None:
        """Record a named metric for the report and the tests (`colquant.evaluate.metrics.record`)."""
        metrics.record(self.results, metric, values)


def setup(profile_path: str | Path, *, seed: int = 0, notice: bool = True) -> Notebook:
    """Quiet logging, styling and seeds; load the profile; show its random-weights notice.

    `seed` seeds Python, NumPy and torch, so sampling inside a notebook repeats run after run
    (calibration and corpus sampling take their own seeds from the profile).
    """
    _quiet_libraries()
    sns.set_theme(style="whitegrid")
    pd.set_option("display.precision", 4)
    _seed_everything(seed)
    profile = load_profile(workspace.resolve(profile_path))
    book = Notebook(profile=profile, results=workspace.results_dir(profile), plots=workspace.plots_dir(profile))
    book.results.mkdir(parents=True, exist_ok=True)  # notebooks write their results here
    if notice:
        display(Markdown(workspace.random_weights_notice(profile)))
    return book


def _quiet_libraries() -> None:
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_bytes(directory: str | Path) -> int:
    """A checkpoint's weights on disk (its safetensors files), counted as quantization counts a variant's."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*.safetensors"))


def say(markdown: str) -> None:
    """Display generated prose as a markdown output (the interpretation after a result)."""
    display(Markdown(markdown))
