"""`outputs/<profile>/REPORT.md`: a headline, then the seed reports' tables, filled from this run.

The headline answers "which variant should I use and why" from the named metrics the notebooks
recorded (`colquant.evaluate.metrics`); the tables read what the notebooks wrote under `results/` and
`plots/`, variants in one order (BF16, auto-round by seqlen, baselines, FP8, others). A section
whose inputs are missing says so instead of being left out, so a partial run is visibly partial,
and a missing or NaN number is shown as missing, never as a pass. Results the pipeline found stale
(computed from variants or settings a partial run has changed since) are never shown, in the report
or in the variants' model cards: their sections say how to recompute them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from colquant.evaluate import metrics
from colquant.evaluate.plots import BASELINE, variant_order, variant_precision
from colquant.evaluate.sweep import devices_of
from colquant.inference.compress import compression_report
from colquant.quantize.cards import update_model_card
from colquant.quantize.weight_formats import kernel_path, weight_format
from colquant.research import workspace
from colquant.research.frontier import frontier_report
from colquant.research.interpret import plural, reference_note

# A variant whose mean NDCG@5 is within this many percent of BF16's may be recommended over it.
TOLERANCE_PCT = 2.0
MISSING = "–"
SWEEP_ROWS = "sweep.jsonl"  # notebook 06's rows, with the device each was measured on


def write_report(profile: dict[str, Any], stale: frozenset[str] = frozenset()) -> Path:
    """REPORT.md from what the notebooks wrote, and the variants' cards updated to match.

    `stale`: notebooks (`"05_vidore_eval"`, ...) whose results on disk no longer describe the
    current variants or settings (`colquant.research.steps.stale_steps`); their sections, metrics, plots
    and card numbers are left out, and the report says how to recompute them.
    """
    results = workspace.results_dir(profile)
    fresh = {name: rows for name, rows in metrics.read(results).items()
             if name not in metrics.REGISTRY or metrics.REGISTRY[name].notebook not in stale}

    def unless_stale(notebook: str, title: str, section: Callable[[], str]) -> str:
        return _stale_section(title, notebook, profile) if notebook in stale else section()

    scoring = profile["evaluation"].get("scoring", "colpali")
    sections = [
        f"# ColQuant report: profile `{profile['profile']}`\n\n{workspace.random_weights_notice(profile)}\n\n"
        f"Base model revision: `{workspace.base_model_revision(profile)}`. "
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `python -m colquant run`.",
        "## Headline\n\n" + headline(fresh, devices=devices_of(results / SWEEP_ROWS)) + "\n\n" + frontier_headline(fresh, profile["frontier"])
        + _stale_note(stale, profile),
        unless_stale("01_architecture", "Model", lambda: _model_section(results)),
        unless_stale("03_quantization", "Quantization", lambda: _quantization_section(results, profile)),
        unless_stale("05_vidore_eval", "Retrieval quality (NDCG@5)", lambda: _quality_section(results, scoring)),
        unless_stale("07_index_compression", "Index compression", lambda: compression_report(results)),
        unless_stale("08_frontier", "The quality-memory frontier", lambda: frontier_report(results)),
        unless_stale("04_embedding_fidelity", "Embedding fidelity", lambda: _fidelity_section(results)),
        unless_stale("06_memory_sweep", "Memory and throughput", lambda: _sweep_section(results)),
        _plots_section(workspace.plots_dir(profile), workspace.output_dir(profile), stale),
    ]
    update_variant_cards(profile, stale)
    return workspace.write_text(workspace.output_dir(profile) / "REPORT.md", "\n\n".join(sections) + "\n")


def _rerun_command(profile: dict[str, Any]) -> str:
    return f"`colquant run {profile['profile']}` (it re-runs only what changed)"


def _stale_section(title: str, notebook: str, profile: dict[str, Any]) -> str:
    return (f"## {title}\n\n_Stale: the results of `notebooks/{notebook}.ipynb` were computed from variants or "
            "settings that have changed since (a partial run re-quantized a variant or changed a setting it reads), "
            f"so they are not shown. Recompute them with {_rerun_command(profile)}._")


def _stale_note(stale: frozenset[str], profile: dict[str, Any]) -> str:
    if not stale:
        return ""
    return (f"\n\n_Left out as stale: the results of {', '.join(f'`{name}`' for name in sorted(stale))}, computed "
            f"from variants or settings that have changed since; recompute them with {_rerun_command(profile)}._")


def headline(recorded: dict[str, list[dict[str, Any]]], tolerance_pct: float = TOLERANCE_PCT, *,
             devices: Mapping[tuple[str, str], str] | None = None) -> str:
    """Three sentences: which variant to use, what it costs in NDCG@5, what it saves in memory and time
    (on the device `devices` names for the pick's sweep rows; a W4A8 run on a CPU also says that it ran
    the kernel's reference, `interpret.reference_note`).

    The pick is the quantized variant with the highest mean NDCG@5 among those within
    `tolerance_pct` % of BF16's; when none is, the headline says to keep BF16 and names the closest.
    A value that is missing or NaN is said to be missing; it never counts as within tolerance.
    """
    ndcg = metrics.values(recorded, metrics.NDCG_AT_5)
    candidates = [name for name in variant_order(ndcg) if name != BASELINE]
    if BASELINE not in ndcg or not candidates:
        absent = ([] if BASELINE in ndcg else ["BF16"]) + ([] if candidates else ["every quantized variant"])
        return (f"No recommendation yet: mean NDCG@5 is missing for {' and '.join(absent)}; run "
                "`notebooks/05_vidore_eval.ipynb` (or `python -m colquant run <profile>`) after quantizing.")
    base = ndcg[BASELINE]
    within = [name for name in candidates if ndcg[name] >= base * (1 - tolerance_pct / 100)]
    pick = max(within or candidates, key=lambda name: ndcg[name])
    tasks = metrics.values(recorded, metrics.TASKS_EVALUATED).get(pick)
    over = f" over {int(tasks)} task{'s' if tasks != 1 else ''}" if tasks else ""
    change = f"{(ndcg[pick] / base - 1) * 100:+.2f}%"
    if within:
        first = (f"Use **`{pick}`**: its mean NDCG@5{over} is {ndcg[pick]:.4f} against BF16's {base:.4f} ({change}), "
                 f"the best of the {len(candidates)} quantized variants and within {tolerance_pct:g}% of BF16.")
    else:
        first = (f"Keep **BF16** where quality decides: no quantized variant stays within {tolerance_pct:g}% of its "
                 f"mean NDCG@5{over} ({base:.4f}); the closest, `{pick}`, scores {ndcg[pick]:.4f} ({change}).")
    return " ".join([first, *_cost_sentences(recorded, pick, devices or {})])


def frontier_headline(recorded: dict[str, list[dict[str, Any]]], frontier: dict[str, Any]) -> str:
    """The frontier's best (weights, index) pair per memory budget and corpus size, as a table: budgets
    down, corpus sizes across (notebook 08's `frontier_pick_*` metrics; "nothing fits" where none does)."""
    ndcg = metrics.values(recorded, metrics.FRONTIER_PICK_NDCG)
    if not ndcg:
        return ("The quality-memory frontier is not computed yet: run `notebooks/08_frontier.ipynb` (or "
                "`python -m colquant run <profile>`) after 07.")
    gib = metrics.values(recorded, metrics.FRONTIER_PICK_GIB)
    picks = {(float(budget), int(pages)): (variant, setting, value, gib.get((budget, pages, variant, setting)))
             for (budget, pages, variant, setting), value in ndcg.items()}
    rows = []
    for budget in frontier["memory_budgets_gb"]:
        row = {"budget": f"{budget:g} GiB"}
        for pages in frontier["corpus_pages"]:
            pick = picks.get((float(budget), int(pages)))
            row[f"{pages:,} pages"] = (
                "nothing fits" if pick is None else
                f"`{pick[0]}` + `{pick[1]}` index: NDCG@5 {pick[2]:.4f}, {_cell(pick[3])} GiB")
        rows.append(row)
    return ("The frontier's best pair per memory budget (weights + page index, total = model bytes on the GPU + "
            "index bytes for the corpus; notebook 08):\n\n" + pd.DataFrame(rows).to_markdown(index=False))


def _cost_sentences(recorded: dict[str, list[dict[str, Any]]], pick: str,
                    devices: Mapping[tuple[str, str], str]) -> list[str]:
    """Memory and throughput of `pick` against BF16 at the sweep's reference batch (pages, else queries),
    with the device they were measured on where known."""
    memory = metrics.values(recorded, metrics.PEAK_MEMORY_MIB)
    speed = metrics.values(recorded, metrics.ITEMS_PER_S)
    batches = metrics.values(recorded, metrics.REFERENCE_BATCH)
    kind = next((k for k in ("page", "query") if (pick, k) in memory and (BASELINE, k) in memory), None)
    if kind is None:
        return ["Its memory and speed are not measured yet: run `notebooks/06_memory_sweep.ipynb`."]
    batch = f" at batch {int(batches[kind])}" if kind in batches else ""
    device = devices.get((pick, kind))
    where = f" on {device}" if device else ""
    ratio = memory[(pick, kind)] / memory[(BASELINE, kind)]
    sentences = [f"Encoding {plural(kind)}{batch}{where}{reference_note(pick, device)}, it peaks at {memory[(pick, kind)]:,.0f} MiB against BF16's "
                 f"{memory[(BASELINE, kind)]:,.0f} MiB ({_change(ratio, 'less', 'more')})."]
    if (pick, kind) in speed and (BASELINE, kind) in speed:
        pace = speed[(pick, kind)] / speed[(BASELINE, kind)]
        sentences.append(f"It encodes {speed[(pick, kind)]:.3g} {plural(kind)}/s against BF16's {speed[(BASELINE, kind)]:.3g} "
                         f"({_change(pace, 'slower', 'faster')}).")
    else:
        sentences.append("Its throughput is not measured yet: run `notebooks/06_memory_sweep.ipynb`.")
    return sentences


def _change(ratio: float, below: str, above: str) -> str:
    """0.44 -> "0.44×, 56% less"; 1.3 -> "1.30×, 30% more"; 31 -> "31×" (a percentage that large reads as noise)."""
    if ratio >= 2:
        return f"{ratio:.3g}×"
    return f"{ratio:.2f}×, {abs(1 - ratio):.0%} {below if ratio < 1 else above}"


def _missing(what: str, notebook: str) -> str:
    return f"_No {what} yet: run `{notebook}` (or `python -m colquant run <profile>`)._"


def _cell(value: Any) -> str:
    """Integers with thousands separators, floats to 4 significant digits (large ones as integers), NaN as missing."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _table(frame: pd.DataFrame) -> str:
    """A markdown table with every cell formatted by `_cell` (pandas' floatfmt would print 1.2e+05)."""
    return frame.astype(object).map(_cell).to_markdown(index=False, disable_numparse=True)


def _model_section(results: Path) -> str:
    path = results / "architecture.json"
    if not path.exists():
        return "## Model\n\n" + _missing("architecture summary", "notebooks/01_architecture.ipynb")
    facts = json.loads(path.read_text())
    params = pd.DataFrame(facts["colqwen3_4b"]["parameters"])
    sizes = pd.DataFrame(facts["colqwen3_4b"]["predicted_sizes"])[["scheme", "quantized_params", "GiB", "vs_bf16"]]
    return (
        "## Model: ColQwen3-4B (`TomoroAI/tomoro-colqwen3-embed-4b`)\n\n"
        f"W4A16 on the language model covers {facts['colqwen3_4b']['w4a16_coverage']:.1%} of the parameters.\n\n"
        f"{_table(params)}\n\nPredicted weight memory:\n\n{_table(sizes)}"
    )


def _quantization_section(results: Path, profile: dict[str, Any]) -> str:
    """The variants of the profile's current seqlens only (a seqlen removed from it is not reported)."""
    paths = [results / f"quantization__seqlen{seqlen}.json" for seqlen in sorted(profile["calibration"]["seqlens"])]
    fix = "delete it and re-run notebooks/03_quantization.ipynb (or `python -m colquant run <profile>`)"
    runs = [run for path in paths if path.exists() for run in workspace.read_json(path, fix)]
    if not runs:
        return "## Quantization\n\n" + _missing("quantized variants", "notebooks/03_quantization.ipynb")
    rows = {
        run["variant"]: {
            "variant": run["variant"],
            "method": run["settings"]["method"],
            "weights": weight_format(run["settings"]),
            "sym": run["settings"]["sym"],
            "fast kernel": kernel_path(run["settings"])[0],
            "iters": run["settings"]["iters"],
            "calibration (used)": f"{run['calibration']['source_used']} {run['calibration']['nsamples']}x{run['calibration']['seqlen']}",
            "layers": run["quantized_layers"],
            "size MiB": run["size_on_disk_bytes"] / 2**20,
            "wall s": run["wall_time_s"],
            "peak MiB": run["peak_memory_bytes"] / 2**20,
            "memory": run["memory_kind"],
        }
        for run in runs
    }
    ordered = [rows[name] for name in variant_order(rows)]
    return ("## Quantization (language-model decoder Linear layers)\n\n`fast kernel`: whether a fused kernel runs the "
            "weights on a GPU; the others are evaluated with dequantized weights (real quality and memory, not speed).\n\n"
            + _table(pd.DataFrame(ordered)))


def _quality_section(results: Path, scoring: str) -> str:
    path = results / "ndcg_table.csv"
    if not path.exists():
        return "## Retrieval quality (NDCG@5)\n\n" + _missing("mteb results", "notebooks/05_vidore_eval.ipynb")
    # needs mteb, absent on some GPU boxes
    from colquant.evaluate.evaluation import (
        DELTA_SUFFIX,
        SCORING_LABELS,
        change_counts,
        format_seed_table,
        other_scoring,
        scoring_column,
    )

    table = pd.read_csv(path, index_col=0)
    table = table[_ndcg_column_order(list(table.columns), DELTA_SUFFIX)]
    counts = change_counts(table)
    counts = counts[variant_order(counts.columns)].reset_index(names="tasks")
    extra = scoring_column(workspace.BASELINE, other_scoring(scoring))
    note = (f"Scores use {SCORING_LABELS[scoring]} (`evaluation.scoring: {scoring}`)"
            + (f"; the `{extra}` column scores BF16 the other way, to show whether the choice matters." if extra in table
               else "."))
    return (
        "## Retrieval quality: NDCG@5 per task (mteb)\n\n"
        f"{note}\n\n{format_seed_table(table)}\n\nTasks improved / degraded / unchanged against BF16:\n\n{_table(counts)}"
    )


def _ndcg_column_order(columns: list[str], delta_suffix: str) -> list[str]:
    """The baseline and its other-scoring column first, then each variant in variant order with its Δ%."""
    variants = [column.removesuffix(delta_suffix) for column in columns if column.endswith(delta_suffix)]
    leading = [column for column in columns if column not in variants and not column.endswith(delta_suffix)]
    return leading + [column for variant in variant_order(variants) for column in (variant, variant + delta_suffix)]


def _fidelity_section(results: Path) -> str:
    path = results / "fidelity_summary.csv"
    if not path.exists():
        return "## Embedding fidelity\n\n" + _missing("fidelity results", "notebooks/04_embedding_fidelity.ipynb")
    summary = pd.read_csv(path).set_index("variant")
    summary = summary.loc[variant_order(summary.index)]
    return "## Embedding fidelity against BF16\n\n" + _table(summary.T.reset_index(names="metric"))


def _sweep_section(results: Path) -> str:
    same_batch, budgets = results / "sweep_same_batch.csv", results / "sweep_budgets.csv"
    if not same_batch.exists() or not budgets.exists():
        return "## Memory and throughput\n\n" + _missing("sweep results", "notebooks/06_memory_sweep.ipynb")
    budget_tables = "\n\n".join(f"{plural(kind).capitalize()}:\n\n{_table(table)}"
                                 for kind, table in collapse_budgets(pd.read_csv(budgets)).items())
    return (
        "## Memory and throughput sweep\n\nItems/s per variant at each batch size, and the ratio to BF16's at the "
        f"same batch:\n\n{_table(same_batch_rows(pd.read_csv(same_batch)))}\n\nBest choice per precision under each "
        f"memory budget (the variant, batch size and items/s with the highest throughput that fits):\n\n{budget_tables}"
    )


def same_batch_rows(comparison: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """`sweep.same_batch_comparison`'s wide table turned to one row per variant (in variant order) and one
    column per kind and batch size, each cell "items/s (ratio to the baseline)": long variant names
    become row labels instead of twenty column headers."""
    suffix = "_items_per_s"
    variants = variant_order(column.removesuffix(suffix) for column in comparison.columns if column.endswith(suffix))
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"variant": f"`{variant}`"}
        for record in comparison.to_dict("records"):
            speed, ratio = record[variant + suffix], record.get(f"{variant}_vs_{baseline}")
            cell = _cell(speed) if ratio is None or pd.isna(ratio) or pd.isna(speed) else f"{_cell(speed)} ({ratio:.2f}×)"
            row[f"{plural(record['kind'])}, batch {int(record['batch_size'])}"] = cell
        rows.append(row)
    return pd.DataFrame(rows)


def collapse_budgets(budgets: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per kind, one row per budget and one column per precision (BF16, W4A16, FP8, ...): the best
    variant of that precision that fits, at its best batch size, or "does not fit"."""
    budgets = budgets.assign(precision=budgets["variant"].map(variant_precision))
    precisions = list(dict.fromkeys(variant_precision(name) for name in variant_order(budgets["variant"])))
    collapsed = {}
    for kind, rows in budgets.groupby("kind", sort=False):
        table = []
        for budget, group in rows.groupby("budget_gb", sort=True):
            row: dict[str, Any] = {"budget (GB)": budget}
            for precision in precisions:
                fitting = group[(group["precision"] == precision) & (group["fit"] == "fits")].dropna(subset=["items_per_s"])
                if fitting.empty:
                    row[precision] = "does not fit" if (group["precision"] == precision).any() else MISSING
                else:
                    best = fitting.loc[fitting["items_per_s"].idxmax()]
                    row[precision] = (f"`{best['variant']}` · batch {int(best['batch_size'])} · "
                                      f"{_cell(float(best['items_per_s']))}/s")
            table.append(row)
        collapsed[kind] = _merge_equal_budgets(table)
    return collapsed


def _merge_equal_budgets(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Consecutive budgets with the same choices become one row ("8–80"): the table shows where the choice changes."""
    merged: list[dict[str, Any]] = []
    for row in rows:
        choices = {k: v for k, v in row.items() if k != "budget (GB)"}
        if merged and {k: v for k, v in merged[-1].items() if k not in ("budget (GB)", "_first")} == choices:
            merged[-1]["budget (GB)"] = f"{merged[-1]['_first']:g}–{row['budget (GB)']:g}"
        else:
            merged.append({"budget (GB)": f"{row['budget (GB)']:g}", "_first": row["budget (GB)"], **choices})
    return pd.DataFrame(merged).drop(columns="_first")


def _plots_section(plots: Path, root: Path, stale: frozenset[str] = frozenset()) -> str:
    """Every figure, except those of stale notebooks (a figure's name starts with its notebook's number)."""
    images = sorted(image for image in plots.glob("*.png") if image.name[:2] not in {name[:2] for name in stale})
    if not images:
        return "## Plots\n\n_No plots yet._"
    return "## Plots\n\n" + "\n\n".join(f"![{image.stem}]({image.relative_to(root)})" for image in images)


def variant_results(results: Path, scoring: str = "colpali", stale: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Per variant, the headline numbers known so far: fidelity against BF16 and NDCG@5 (in the
    evaluation's main scoring mode); none from a notebook in `stale`."""
    known: dict[str, dict[str, Any]] = {}
    fidelity = results / "fidelity_summary.csv"
    if fidelity.exists() and "04_embedding_fidelity" not in stale:
        for row in pd.read_csv(fidelity).to_dict("records"):
            known.setdefault(row["variant"], {}).update(
                {
                    "query token cosine vs BF16 (mean)": round(row["query_token_cosine_mean"], 4),
                    "page token cosine vs BF16 (mean)": round(row["page_token_cosine_mean"], 4),
                    "top-5 page overlap with BF16": round(row["top5_overlap"], 4),
                }
            )
    ndcg = results / "ndcg.csv"
    if ndcg.exists() and "05_vidore_eval" not in stale:
        frame = pd.read_csv(ndcg)
        frame = frame[frame["scoring"] == scoring] if "scoring" in frame else frame
        for variant, scores in frame.groupby("variant"):
            known.setdefault(variant, {})[f"NDCG@5, mean of {len(scores)} tasks"] = round(scores["ndcg_at_5"].mean(), 5)
    return known


def update_variant_cards(profile: dict[str, Any], stale: frozenset[str] = frozenset()) -> None:
    """Write what the later notebooks measured for each quantized variant into its model card,
    replacing what was there: numbers of a stale notebook leave the card."""
    known = variant_results(workspace.results_dir(profile), profile["evaluation"].get("scoring", "colpali"), stale)
    for name, path in workspace.quantized_variants(profile).items():
        update_model_card(path, known.get(name, {}))
