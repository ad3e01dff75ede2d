"""Shared plot styling, so every figure and table of a run tells the variants apart the same way.

One order (BF16, auto-round by calibration seqlen, baselines, FP8, W4A8 runs, then anything else), one colour
per variant in every figure, legends beside the axes (variant names are long), and the
random-weights note on every figure of a random-weights profile.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

BASELINE = "bf16"
RANDOM_WEIGHTS_NOTE = "random weights: checks the machinery, not retrieval quality"
_SEQLEN = re.compile(r"seqlen(\d+)")
# Families in report and legend order; each family draws its colours from its own palette, so a
# variant's colour says what kind of variant it is (shades of one hue: the same method, other settings).
_FAMILIES = ("bf16", "autoround", "rtn", "fp8", "w4a8", "other")
_FAMILY_PALETTES = {"autoround": "crest", "rtn": "Oranges", "fp8": "Greens", "w4a8": "Purples", "other": "Set2"}
_BF16_COLOUR = (0.25, 0.25, 0.25)


def variant_family(name: str) -> str:
    """bf16, autoround (a `seqlen<N>` in the name), rtn, fp8, w4a8 (an auto-round checkpoint run as W4A8),
    or other (a kind this module does not know)."""
    if name == BASELINE:
        return "bf16"
    if name.startswith("w4a8-"):
        return "w4a8"
    if _SEQLEN.search(name):
        return "autoround"
    if name.endswith("-rtn"):
        return "rtn"
    if name.startswith("fp8"):
        return "fp8"
    return "other"


def variant_precision(name: str) -> str:
    """The weight precision a variant runs at, for "best choice per precision" (BF16, W4A16, FP8, ...)."""
    if name == BASELINE:
        return "BF16"
    return name.split("-")[0].upper()


def _sort_key(name: str) -> tuple[int, int, str]:
    seqlen = _SEQLEN.search(name)
    return _FAMILIES.index(variant_family(name)), int(seqlen.group(1)) if seqlen else 0, name


def variant_order(names: Iterable[str]) -> list[str]:
    """BF16, then auto-round variants by calibration seqlen (numerically), then RTN, FP8, W4A8, then the rest."""
    return sorted(dict.fromkeys(names), key=_sort_key)


def variant_palette(names: Iterable[str]) -> dict[str, Any]:
    """One colour per variant: dark grey for BF16, one hue per family, shades within a family by order.

    Pass every variant of the run (not only those one figure shows) so a variant keeps its colour
    across figures; `colquant.research.notebook.setup` builds it once per notebook.
    """
    ordered = variant_order(names)
    palette: dict[str, Any] = {}
    for family in _FAMILIES:
        members = [name for name in ordered if variant_family(name) == family]
        if not members:
            continue
        if family == "bf16":
            colours = [_BF16_COLOUR]
        elif family == "other":
            colours = sns.color_palette(_FAMILY_PALETTES[family], len(members))
        else:  # sequential: one shade more than needed, the lightest dropped, so no variant is nearly white
            colours = sns.color_palette(_FAMILY_PALETTES[family], len(members) + 1)[1:]
        palette.update(zip(members, colours))
    return palette


def hue_style(names: Iterable[str], palette: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`hue_order` and `palette` keyword arguments for a seaborn call whose hue is the variant."""
    shown = variant_order(names)
    colours = palette if palette is not None else variant_palette(shown)
    missing = [name for name in shown if name not in colours]
    if missing:
        raise ValueError(f"no colour for {missing}: build the palette from every variant of the run "
                         "(colquant.evaluate.plots.variant_palette(names))")
    return {"hue_order": shown, "palette": {name: colours[name] for name in shown}}


def legend_outside(axes: Axes | Iterable[Axes]) -> None:
    """One legend, to the right of the last panel; the other panels' legends are removed."""
    panels = [axes] if isinstance(axes, Axes) else list(axes)
    for ax in panels[:-1]:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if panels[-1].get_legend() is not None:
        sns.move_legend(panels[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)


def mark_random_weights(figure: Figure, random_weights: bool) -> Figure:
    """Stamp the random-weights note under the figure's title area, so a saved plot cannot be
    mistaken for a quality result when it travels without its notebook."""
    if random_weights:
        figure.text(0.5, 1.0, RANDOM_WEIGHTS_NOTE, ha="center", va="bottom", fontsize=9, color="firebrick",
                    style="italic", transform=figure.transFigure)
    return figure
