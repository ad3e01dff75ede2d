"""Notebook 08's figures: the frontier (NDCG@5 against total bytes, one panel per corpus size) and the
per-layer sensitivity heatmaps (each projection's own error at 2-3 bits, and AutoScheme's choice)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from colquant.evaluate.plots import hue_style, legend_outside
from colquant.research.frontier import GIB, pareto_front

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def plot_frontier(table: pd.DataFrame, *, dequantized: Collection[str] = (), budgets_gb: Collection[float] = (),
                  palette: Mapping[str, Any] | None = None) -> Figure:
    """NDCG@5 against total GiB (log), one panel per corpus size: colour per variant, marker per index
    setting, the Pareto front dashed, budgets as vertical lines, and a black ring around the pairs whose
    weights run dequantized (no fast kernel)."""
    sizes = sorted(table["pages"].unique())
    figure = Figure(figsize=(5 * len(sizes) + 3, 4.5), layout="constrained")
    axes = figure.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    data = table.assign(total_gib=table["total_bytes"] / GIB)
    for ax, pages in zip(axes, sizes):
        panel = data[data["pages"] == pages]
        sns.scatterplot(data=panel, x="total_gib", y="ndcg_at_5", hue="variant", style="setting", s=70, ax=ax,
                        **hue_style(table["variant"], palette))
        ringed = panel[panel["variant"].isin(dequantized)]
        if not ringed.empty:
            ax.scatter(ringed["total_gib"], ringed["ndcg_at_5"], s=180, facecolors="none", edgecolors="black",
                       linewidths=0.8, label="dequantized (no fast kernel)")
        front = pareto_front(panel)
        ax.plot(front["total_bytes"] / GIB, front["ndcg_at_5"], color="black", linewidth=0.8, linestyle="--",
                label="Pareto front")
        for budget in budgets_gb:
            if panel["total_gib"].min() <= budget <= panel["total_gib"].max() * 1.5:
                ax.axvline(budget, color="firebrick", linewidth=0.6, linestyle=":")
        ax.set(xscale="log", xlabel="model + index (GiB, log scale)", ylabel="NDCG@5 (mean over tasks)",
               title=f"{pages:,} pages")
    legend_outside(axes)
    return figure


def plot_sensitivity(data: pd.DataFrame) -> Figure:
    """One heatmap per low-bit variant: each decoder projection's own relative L2 error on pages, layers
    down, projections across; AutoScheme variants get a second panel with the bits it chose."""
    variants = list(dict.fromkeys(data["variant"]))
    mixed = [name for name in variants if data.loc[data["variant"] == name, "bits"].nunique() > 1]
    panels = [(name, "relative_l2") for name in variants] + [(name, "bits") for name in mixed]
    layers = data["layer"].nunique()
    figure = Figure(figsize=(3.6 * len(panels) + 1, 1.2 + 0.28 * layers), layout="constrained")
    *axes, colorbar = figure.subplots(1, len(panels) + 1, width_ratios=[1] * len(panels) + [0.06])
    for ax, (name, value) in zip(axes, panels):
        grid = (data[data["variant"] == name].pivot_table(index="layer", columns="projection", values=value)
                .reindex(columns=[p for p in PROJECTIONS if p in set(data["projection"])]))
        if value == "bits":
            sns.heatmap(grid, ax=ax, annot=True, fmt=".0f", cmap="Purples", vmin=0, vmax=10, cbar=False)
            ax.set_title(f"AutoScheme's bits\n{name}", fontsize=8)
        else:
            sns.heatmap(grid, ax=ax, vmin=0, vmax=data["relative_l2"].max(), cmap="rocket_r", cbar_ax=colorbar,
                        cbar_kws={"label": "own relative L2 error (pages)"})
            ax.set_title(name, fontsize=8)
        ax.set(xlabel="", ylabel="decoder layer")
        ax.tick_params(axis="x", labelrotation=45)
    return figure
