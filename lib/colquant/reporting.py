"""`outputs/<profile>/REPORT.md`: the seed reports' tables, filled from this run's result files.

The report only reads what the notebooks wrote under `results/` and `plots/`; a section whose
inputs are missing says so instead of being left out, so a partial run is visibly partial.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from colquant import workspace
from colquant.compress import compression_report


def write_report(profile: dict[str, Any]) -> Path:
    results = workspace.results_dir(profile)
    sections = [
        f"# ColQuant report: profile `{profile['profile']}`\n\n{workspace.random_weights_notice(profile)}\n\n"
        f"Base model revision: `{workspace.base_model_revision(profile)}`. "
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `python -m colquant run`.",
        _model_section(results),
        _quantization_section(results, profile),
        _quality_section(results, profile["evaluation"].get("scoring", "colpali")),
        compression_report(results),
        _fidelity_section(results),
        _sweep_section(results),
        _plots_section(workspace.plots_dir(profile), workspace.output_dir(profile)),
    ]
    update_variant_cards(profile)
    return workspace.write_text(workspace.output_dir(profile) / "REPORT.md", "\n\n".join(sections) + "\n")


def _missing(what: str, notebook: str) -> str:
    return f"_No {what} yet: run `{notebook}` (or `python -m colquant run <profile>`)._"


def _table(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    return frame.to_markdown(index=False, floatfmt=floatfmt)


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
        f"{_table(params)}\n\nPredicted weight memory:\n\n{_table(sizes, '.3f')}"
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
            "bits / group / sym": f"{run['settings']['bits']} / {run['settings']['group_size']} / {run['settings']['sym']}",
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
    return "## Quantization (auto-round W4A16, language-model decoder Linear layers)\n\n" + _table(pd.DataFrame(rows.values()))


def _quality_section(results: Path, scoring: str) -> str:
    path = results / "ndcg_table.csv"
    if not path.exists():
        return "## Retrieval quality (NDCG@5)\n\n" + _missing("mteb results", "notebooks/05_vidore_eval.ipynb")
    # needs mteb, absent on some GPU boxes
    from colquant.evaluation import SCORING_LABELS, change_counts, format_seed_table, other_scoring, scoring_column

    table = pd.read_csv(path, index_col=0)
    counts = change_counts(table).reset_index()
    extra = scoring_column(workspace.BASELINE, other_scoring(scoring))
    note = (f"Scores use {SCORING_LABELS[scoring]} (`evaluation.scoring: {scoring}`)"
            + (f"; the `{extra}` column scores BF16 the other way, to show whether the choice matters." if extra in table
               else "."))
    return (
        "## Retrieval quality: NDCG@5 per task (mteb)\n\n"
        f"{note}\n\n{format_seed_table(table)}\n\nTasks improved / degraded / unchanged against BF16:\n\n{_table(counts)}"
    )


def _fidelity_section(results: Path) -> str:
    path = results / "fidelity_summary.csv"
    if not path.exists():
        return "## Embedding fidelity\n\n" + _missing("fidelity results", "notebooks/04_embedding_fidelity.ipynb")
    summary = pd.read_csv(path)
    return "## Embedding fidelity against BF16\n\n" + _table(summary.set_index("variant").T.reset_index(names="metric"))


def _sweep_section(results: Path) -> str:
    same_batch, budgets = results / "sweep_same_batch.csv", results / "sweep_budgets.csv"
    if not same_batch.exists() or not budgets.exists():
        return "## Memory and throughput\n\n" + _missing("sweep results", "notebooks/06_memory_sweep.ipynb")
    return (
        "## Memory and throughput sweep\n\nSame batch size, side by side:\n\n"
        f"{_table(pd.read_csv(same_batch))}\n\nBest batch size per memory budget:\n\n{_table(pd.read_csv(budgets))}"
    )


def _plots_section(plots: Path, root: Path) -> str:
    images = sorted(plots.glob("*.png"))
    if not images:
        return "## Plots\n\n_No plots yet._"
    return "## Plots\n\n" + "\n\n".join(f"![{image.stem}]({image.relative_to(root)})" for image in images)


def variant_results(results: Path, scoring: str = "colpali") -> dict[str, dict[str, Any]]:
    """Per variant, the headline numbers known so far: fidelity against BF16 and NDCG@5 (in the
    evaluation's main scoring mode)."""
    known: dict[str, dict[str, Any]] = {}
    fidelity = results / "fidelity_summary.csv"
    if fidelity.exists():
        for row in pd.read_csv(fidelity).to_dict("records"):
            known.setdefault(row["variant"], {}).update(
                {
                    "query token cosine vs BF16 (mean)": round(row["query_token_cosine_mean"], 4),
                    "page token cosine vs BF16 (mean)": round(row["page_token_cosine_mean"], 4),
                    "top-5 page overlap with BF16": round(row["top5_overlap"], 4),
                }
            )
    ndcg = results / "ndcg.csv"
    if ndcg.exists():
        frame = pd.read_csv(ndcg)
        frame = frame[frame["scoring"] == scoring] if "scoring" in frame else frame
        for variant, scores in frame.groupby("variant"):
            known.setdefault(variant, {})[f"NDCG@5, mean of {len(scores)} tasks"] = round(scores["ndcg_at_5"].mean(), 5)
    return known


def update_variant_cards(profile: dict[str, Any]) -> None:
    """Write what the later notebooks measured into each quantized variant's model card."""
    from colquant.quantization import update_model_card

    known = variant_results(workspace.results_dir(profile), profile["evaluation"].get("scoring", "colpali"))
    for name, path in workspace.quantized_variants(profile).items():
        if name in known:
            update_model_card(path, known[name])
