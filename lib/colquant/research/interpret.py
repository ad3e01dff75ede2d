"""The sentences after each notebook result, written from the numbers, so they change with the profile.

Each function takes what a result cell computed and returns markdown: what the table or figure
shows, which variant does best and what to look at next. Missing or NaN values are said to be
missing, never read as a pass. The notebooks display them with `colquant.research.notebook.say(...)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from colquant.evaluate.plots import BASELINE, variant_family, variant_order


PLURALS = {"page": "pages", "query": "queries"}


def plural(kind: str) -> str:
    """"pages", "queries": the sweep's item kinds as prose."""
    return PLURALS.get(kind, f"{kind}s")


def _name(variant: str) -> str:
    return f"`{variant}`"


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and not pd.isna(value)


def _list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.0f} B"


# --- 01 architecture --------------------------------------------------------------------------


def parameter_shares(params: pd.DataFrame, model: str) -> str:
    """Which components hold the parameters (the bound on what quantizing one of them saves)."""
    ranked = params.sort_values("share", ascending=False)
    parts = [f"{row.component} {row.share:.1%}" for row in ranked.head(3).itertuples()]
    return (f"{model} has {params['params'].sum():,} parameters: {_list(parts)}. A scheme that quantizes "
            f"only the {ranked.iloc[0].component} can save at most that share of the weight memory.")


def coverage(inventory: pd.DataFrame, share: float) -> str:
    """How much of the model W4A16 (language model only) quantizes."""
    quantized = inventory[inventory["w4a16_lm_only"]]
    return (f"W4A16 quantizes {len(quantized):,} of {len(inventory):,} Linear layers, {share:.1%} of all "
            f"parameters; the other {len(inventory) - len(quantized):,} Linear layers (vision tower, projection) "
            "and the token embeddings stay 16-bit.")


def predicted_sizes(sizes: pd.DataFrame) -> str:
    """Weight memory per scheme against BF16's."""
    bf16 = sizes[sizes["vs_bf16"] == 1.0].iloc[0]
    others = [f"{row.scheme} {row.GiB:.2f} GiB ({row.vs_bf16:.0%})" for row in sizes[sizes["vs_bf16"] != 1.0].itertuples()]
    return (f"BF16 weights take {bf16.GiB:.2f} GiB; {_list(others)}. Activations, the page index and the "
            "CUDA context come on top: notebook 06 measures the real peak.")


def profile_model(params: pd.DataFrame, reference: pd.DataFrame) -> str:
    """How the profile's model differs from the 4B in where its parameters sit."""
    key = "language model (decoder Linear)"
    own = params.set_index("component")["share"].get(key, 0.0)
    full = reference.set_index("component")["share"].get(key, 0.0)
    text = (f"This profile's model has {params['params'].sum():,} parameters, {own:.1%} of them in the decoder "
            f"Linear layers (the 4B: {full:.1%}).")
    if own < full / 2:
        text += (" Its 4-bit checkpoints therefore shrink far less than the 4B's would: on this profile, sizes "
                 "and speeds check the formats and the code paths, not the savings.")
    return text


# --- 02 calibration ---------------------------------------------------------------------------


def calibration_source(summary: Mapping[str, Any]) -> str:
    """Where the calibration tokens came from, and whether the profile's offline fallback was taken."""
    used, requested = summary["source used"], summary["requested source"]
    text = f"{summary['samples']} samples of up to {summary['tokens per sample']} tokens from `{used}`"
    if used == requested:
        return text + ", the source the profile asks for."
    return (text + f", not the requested `{requested}`: the profile's offline fallback was taken "
            f"({summary['fallback reason']}), and the variant names carry `{used}` so no result passes for a "
            f"`{requested}` calibration.")


def calibration_stats(stats: pd.DataFrame) -> str:
    """How long the samples are and which origin dominates."""
    tokens, origins = stats["tokens"], stats["main_origin"].value_counts()
    lengths = (f"Every sample holds {tokens.min():,} tokens" if tokens.min() == tokens.max()
               else f"Samples hold {tokens.min():,}–{tokens.max():,} tokens (mean {tokens.mean():,.0f})")
    return (f"{lengths}; {origins.iloc[0]} of "
            f"{len(stats)} come mainly from `{origins.index[0]}`"
            + (f", the rest from {len(origins) - 1} other origin{'s' if len(origins) > 2 else ''}." if len(origins) > 1
               else ": a single origin, so the set covers one kind of text only."))


# --- 03 quantization --------------------------------------------------------------------------


def quantization(runs: Sequence[Mapping[str, Any]], bf16_bytes: float) -> str:
    """What each variant quantized and how large its checkpoint is against BF16's."""
    parts = [f"{_name(run['variant'])} {run['quantized_layers']} layers, {_size(run['size_on_disk_bytes'])} "
             f"({run['size_on_disk_bytes'] / bf16_bytes:.0%} of BF16's {_size(bf16_bytes)})" for run in runs]
    return "Quantized: " + "; ".join(parts) + ". Next: the reload check below, then fidelity (04) and quality (05)."


def quantization_cost(runs: Sequence[Mapping[str, Any]]) -> str:
    """Time and memory the quantization took (varies between runs)."""
    parts = [f"{_name(run['variant'])} took {run['wall_time_s']:.1f} s and peaked at "
             f"{_size(run['peak_memory_bytes'])} ({run['memory_kind']})"
             + (", reused from an earlier run" if run.get("reused") else "") for run in runs]
    return "; ".join(parts) + "."


def layer_check(tables: Mapping[str, pd.DataFrame]) -> str:
    """Whether every reloaded variant holds packed decoder layers at the widths it was made with and
    nothing else quantized (FP8 variants: how many FP8 layers, in which components)."""
    lines = []
    for variant, table in tables.items():
        fp8_layers = table[table["layer type"] == "FP8Linear"]  # FP8 variants (colquant.retriever.fp8): e4m3 layers, by scope
        if not fp8_layers.empty:
            lines.append(f"- {_name(variant)}: {fp8_layers['layers'].sum():,} FP8 (e4m3) layers, in "
                         f"{', '.join(sorted(set(fp8_layers['component'])))}.")
            continue
        packed = table[table["bits"] < 16]
        stray = packed[packed["component"] != "language model (decoder Linear)"]
        widths = packed.groupby("bits")["layers"].sum()
        verdict = ("only the decoder Linear layers are packed" if not packed.empty and stray.empty
                   else "no packed layer came back" if packed.empty
                   else f"packed layers outside the decoder: {sorted(set(stray['component']))}")
        counted = ", ".join(f"{count:,} at {bits} bits" for bits, count in widths.items())
        lines.append(f"- {_name(variant)}: {widths.sum():,} packed layers ({counted or 'none'}); {verdict}.")
    return "\n".join(lines)


# --- 04 fidelity ------------------------------------------------------------------------------


def fidelity_summary(summary: pd.DataFrame, threshold: float) -> str:
    """Which variants pass seed 003's cosine threshold and which stays closest to BF16."""
    ranked = summary.assign(overall=(summary["query_token_cosine_mean"] + summary["page_token_cosine_mean"]) / 2)
    ranked = ranked.dropna(subset=["overall"]).sort_values("overall", ascending=False)
    failing = [_name(v) for v in summary.loc[summary["passes"] != True, "variant"]]  # noqa: E712 (NaN is not a pass)
    if ranked.empty:
        return "No variant has token cosines: the fidelity run produced no numbers to judge."
    best = ranked.iloc[0]
    text = (f"Closest to BF16: {_name(best.variant)}, mean token cosine {best.query_token_cosine_mean:.4f} (queries) "
            f"and {best.page_token_cosine_mean:.4f} (pages), top-5 overlap {best.top5_overlap:.2f}. ")
    text += (f"Every variant passes the {threshold:g} threshold with no NaN/Inf." if not failing
             else f"Below the {threshold:g} threshold or with NaN/Inf: {_list(failing)}.")
    if len(ranked) > 1:
        worst = ranked.iloc[-1]
        text += (f" Furthest: {_name(worst.variant)} ({worst.query_token_cosine_mean:.4f} / "
                 f"{worst.page_token_cosine_mean:.4f}).")
    return text


def token_tails(summary: pd.DataFrame) -> str:
    """The left tail of the cosine distributions: the tokens the mean hides."""
    parts = [f"{_name(row.variant)} 5th percentile {row.query_token_cosine_p05:.3f} / {row.page_token_cosine_p05:.3f}, "
             f"worst token {row.query_token_cosine_min:.3f} / {row.page_token_cosine_min:.3f}"
             for row in summary.itertuples()]
    return "Queries / pages: " + "; ".join(parts) + ". A long left tail means a few tokens moved a lot, which MaxSim can pick up."


def layer_growth(layer_errors: pd.DataFrame) -> str:
    """How the relative error grows from the first to the last decoder layer, per variant."""
    parts = []
    for (variant, kind), rows in layer_errors.groupby(["variant", "kind"], sort=False):
        rows = rows.sort_values("layer")
        first, last = rows["relative_l2"].iloc[0], rows["relative_l2"].iloc[-1]
        parts.append((variant, kind, first, last))
    frame = pd.DataFrame(parts, columns=["variant", "kind", "first", "last"])
    worst = frame.loc[frame["last"].idxmax()]
    best = frame.loc[frame["last"].idxmin()]
    return (f"Relative error grows from about {frame['first'].median():.3f} after the first decoder layer to "
            f"{frame['last'].median():.3f} after the last (medians over variants). Largest at the end: "
            f"{_name(worst.variant)} on {worst.kind} inputs ({worst['last']:.3f}); smallest: {_name(best.variant)} "
            f"on {best.kind} inputs ({best['last']:.3f}).")


def score_agreement(summary: pd.DataFrame) -> str:
    """Whether the MaxSim scores, and so the rankings, follow BF16's."""
    parts = []
    for row in summary.itertuples():
        tau = f"Kendall tau {row.kendall_tau_mean:.2f}" if _known(row.kendall_tau_mean) else "Kendall tau undefined (ties)"
        parts.append(f"{_name(row.variant)} Pearson {row.pearson:.3f}, {tau}, top-1 agreement {row.top1_agreement:.0%}")
    return "; ".join(parts) + ". Scatter off the diagonal is what reorders pages; notebook 05 measures what it costs in NDCG@5."


# --- 05 retrieval quality ---------------------------------------------------------------------


def evaluated(results: pd.DataFrame) -> str:
    """What was evaluated: variants, tasks and scoring modes, and the revision the scores belong to."""
    modes = results.groupby("scoring")["variant"].nunique() if "scoring" in results else pd.Series(dtype=int)
    text = (f"{results['variant'].nunique()} variants × {results['task'].nunique()} task(s), "
            f"{len(results)} rows")
    if len(modes):
        text += " (" + ", ".join(f"{count} variant(s) scored with `{mode}`" for mode, count in modes.items()) + ")"
    if "model_revision" in results:
        text += f"; base model revision `{results['model_revision'].iloc[0]}`"
    return text + ". The seed-000 table below averages them per variant."


def ndcg(table: pd.DataFrame, counts: pd.DataFrame, baseline: str = BASELINE) -> str:
    """Mean NDCG@5 of each variant against the baseline, the best one, and the task counts."""
    from colquant.evaluate.evaluation import DELTA_SUFFIX

    average = table.loc["Average"]
    variants = [column.removesuffix(DELTA_SUFFIX) for column in table.columns if column.endswith(DELTA_SUFFIX)]
    if not variants:
        return f"Only {baseline} was evaluated (mean NDCG@5 {average[baseline]:.4f}): quantize variants with notebook 03."
    ranked = sorted(variants, key=lambda v: -average[v])
    best = ranked[0]
    n_tasks = len(table) - 1
    text = (f"Over {n_tasks} task{'s' if n_tasks != 1 else ''}, {baseline} scores a mean NDCG@5 of {average[baseline]:.4f}; "
            f"the best quantized variant, {_name(best)}, {average[best]:.4f} ({average[best + DELTA_SUFFIX]:+.2f}%).")
    if len(ranked) > 1:
        worst = ranked[-1]
        text += f" The lowest is {_name(worst)} at {average[worst]:.4f} ({average[worst + DELTA_SUFFIX]:+.2f}%)."
    degraded = counts.loc["Degraded"]
    text += (f" {_name(best)} is worse than {baseline} on {degraded[best]} of {n_tasks} tasks. With few tasks and "
             "pages, differences of a few points are within noise: compare the real profile's 22 tasks.")
    extra = [column for column in table.columns if column.startswith(f"{baseline} (")]
    if extra:
        text += (f" Scored the other way, {baseline} gets {average[extra[0]]:.4f} "
                 f"({(average[extra[0]] / average[baseline] - 1) * 100:+.2f}%).")
    return text


# --- 06 memory and throughput -----------------------------------------------------------------


def sweep_rows(results: pd.DataFrame) -> str:
    """How many measurements there are and where the runs ran out of memory."""
    failed = results[results["status"] != "ok"]
    text = f"{len(results) - len(failed)} measurements succeeded"
    if failed.empty:
        return text + "; no batch ran out of memory, so the largest batch sizes did not reach this device's limit."
    first = failed.groupby(["variant", "kind"])["batch_size"].min()
    return text + "; out of memory: " + "; ".join(
        f"{_name(variant)} {plural(kind)} from batch {batch}" for (variant, kind), batch in first.items()) + "."


def reference_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Per kind, the rows at the largest batch size every variant encoded ('ok'): the fair comparison."""
    ok = results[results["status"] == "ok"]
    n_variants = ok["variant"].nunique()
    frames = []
    for kind, rows in ok.groupby("kind", sort=False):
        complete = rows.groupby("batch_size")["variant"].nunique()
        shared = complete[complete == n_variants].index
        if len(shared):
            frames.append(rows[rows["batch_size"] == shared.max()])
    return pd.concat(frames, ignore_index=True) if frames else ok.iloc[:0]


def sweep(reference: pd.DataFrame, baseline: str = BASELINE) -> str:
    """Memory and throughput of each variant against the baseline at the reference batch."""
    lines = []
    for kind, rows in reference.groupby("kind", sort=False):
        rows = rows.set_index("variant")
        if baseline not in rows.index:
            lines.append(f"- {plural(kind)}: no {baseline} row at a batch every variant ran, so no ratio.")
            continue
        base = rows.loc[baseline]
        devices = rows["device"] if "device" in rows else pd.Series(dtype=object)
        parts = [f"{_name(v)}{reference_note(v, devices.get(v))} "
                 f"{rows.loc[v, 'peak_memory_mib'] / base['peak_memory_mib']:.2f}× memory, "
                 f"{rows.loc[v, 'items_per_s'] / base['items_per_s']:.2f}× throughput"
                 for v in variant_order(rows.index) if v != baseline]
        lines.append(f"- {plural(kind)} at batch {int(base['batch_size'])} ({base['memory_kind']}), against {baseline}'s "
                     f"{base['peak_memory_mib']:,.0f} MiB and {_rate(base['items_per_s'])} {plural(kind)}/s: "
                     + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n\nBelow 1× memory is the saving; below 1× throughput, the price of dequantizing on the fly."


def reference_note(variant: str, device: Any) -> str:
    """A W4A8 run measured on CPU timed its dequantized reference (colquant.kernels.w4a8), not the kernel."""
    if variant_family(variant) == "w4a8" and str(device).startswith("cpu"):
        return " (W4A8's dequantized reference on CPU: its arithmetic, not its kernel's speed or memory)"
    return ""


def _rate(items_per_s: float) -> str:
    return f"{items_per_s:,.0f}" if items_per_s >= 100 else f"{items_per_s:.3g}"


def budgets(table: pd.DataFrame) -> str:
    """Under the smallest budget, per kind, who fits and the fastest choice."""
    smallest = table[table["budget_gb"] == table["budget_gb"].min()]
    lines = []
    for kind, rows in smallest.groupby("kind", sort=False):
        fits = rows[rows["fit"] == "fits"]
        if fits.empty:
            lines.append(f"- {plural(kind)}: no variant fits at any measured batch size.")
            continue
        best = fits.loc[fits["items_per_s"].idxmax()]
        lines.append(f"- {plural(kind)}: {fits['variant'].nunique()} of {rows['variant'].nunique()} variants fit; the "
                     f"fastest is {_name(best.variant)} at batch {best.batch_size}, {_rate(best.items_per_s)} {plural(kind)}/s.")
    text = f"Under the smallest budget ({smallest['budget_gb'].iloc[0]:g} GB):\n" + "\n".join(lines)
    if (table["fit"] == "fits").all():
        text += "\n\nEvery variant fits every budget at its largest measured batch: the budgets bind only at larger batches."
    return text


# --- 07 index compression ---------------------------------------------------------------------


def compression(table: pd.DataFrame) -> str:
    """Per setting, the index size and NDCG@5 against the uncompressed index (means over variants)."""
    means = table.groupby("setting", sort=False)[["size_vs_none", "ndcg_vs_none_%"]].mean()
    parts = [f"`{setting}` {row['size_vs_none']:.1%} of the bytes, NDCG@5 {row['ndcg_vs_none_%']:+.1f}%"
             for setting, row in means.drop(index="none", errors="ignore").iterrows()]
    return ("Against each variant's uncompressed index, on average over variants: " + "; ".join(parts)
            + ". Settings that lose little NDCG@5 at a fraction of the bytes are the candidates below.")


# --- 08 frontier ------------------------------------------------------------------------------


def frontier_picks(picks: pd.DataFrame) -> str:
    """Per corpus size, the best pair under each budget (and the budgets nothing fits)."""
    lines = []
    for pages, group in picks.groupby("pages", sort=True):
        parts = [f"{row.budget_gb:g} GiB: {_name(row.variant)} with the `{row.setting}` index, NDCG@5 {row.ndcg_at_5:.4f} "
                 f"({row.total_bytes / 2**30:.3g} GiB)" if row.fit == "fits" else
                 f"{row.budget_gb:g} GiB: nothing fits (the smallest pair needs {row.smallest_total_gib:.3g} GiB)"
                 for row in group.itertuples()]
        lines.append(f"- {int(pages):,} pages: " + "; ".join(parts) + ".")
    return "Best pair per memory budget:\n" + "\n".join(lines)


def sensitivity(table: pd.DataFrame) -> str:
    """Which projections lose most in each low-bit variant, and whether AutoScheme gave them more bits."""
    lines = []
    for variant, group in table.groupby("variant", sort=False):
        worst = group.nlargest(3, "relative_l2")
        named = ", ".join(f"layer {row.layer} {row.projection} ({row.relative_l2:.3f})" for row in worst.itertuples())
        line = f"- {_name(variant)}: largest own error at {named}"
        if group["bits"].nunique() > 1:
            by_bits = group.groupby("bits")["relative_l2"].mean()
            line += "; AutoScheme's widths: " + ", ".join(
                f"{(group['bits'] == bits).sum()} projections at {bits} bits (mean error {error:.3f})"
                for bits, error in by_bits.items())
        lines.append(line + ".")
    return "Each projection's own error on pages, against BF16:\n" + "\n".join(lines)

