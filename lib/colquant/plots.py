"""Shared plot styling: variant names are long, so legends go beside the axes, never over the data."""

from __future__ import annotations

from collections.abc import Iterable

import seaborn as sns
from matplotlib.axes import Axes


def legend_outside(axes: Axes | Iterable[Axes]) -> None:
    """One legend, to the right of the last panel; the other panels' legends are removed."""
    panels = [axes] if isinstance(axes, Axes) else list(axes)
    for ax in panels[:-1]:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if panels[-1].get_legend() is not None:
        sns.move_legend(panels[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
