"""How far a quantized variant's embeddings drift from the reference, and whether retrieval notices.

Seed 003's acceptance test is "cosine similarity to BF16 > 0.95, small MSE, no NaN/Inf". Cosine alone
does not say whether retrieval changes, so the same queries and pages are also scored (MaxSim) by
both models and the rankings compared. `layer_errors` locates where along the text tower the error
grows, which is what decides whether to keep some layers in 16 bit.

Everything compares a candidate with the reference on identical inputs, so token sets line up one to
one: the quantized Linear layers change values, never the tokenization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats

from colquant.evaluate.plots import hue_style, legend_outside
from colquant.retriever import encode
from colquant.retriever.encode import model_device
from colquant.retriever.scoring import score

COSINE_THRESHOLD = 0.95  # seed 003's acceptance bar for embedding cosine vs BF16
Variant = tuple[torch.nn.Module, Any]  # (model, processor)


# --- encoding -------------------------------------------------------------------------------------


def encode_queries(model: torch.nn.Module, processor: Any, texts: Sequence[str], batch_size: int) -> list[torch.Tensor]:
    """Per-query (tokens, dim) float32 embeddings on CPU, padding removed (`colquant.encode`)."""
    return encode.encode_queries(model, texts, processor=processor, batch_size=batch_size, show_progress_bar=True)


def encode_pages(
    model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], batch_size: int
) -> list[torch.Tensor]:
    """Per-page (tokens, dim) float32 embeddings on CPU, padding removed (`colquant.encode`)."""
    return encode.encode_pages(model, images, processor=processor, batch_size=batch_size, show_progress_bar=True)


# --- embedding and ranking agreement --------------------------------------------------------------


def token_cosines(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cosine of each candidate token vector with the same token's reference vector, per item."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference items but {len(candidate)} candidate items")
    cosines = []
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        if ref.shape != cand.shape:
            raise ValueError(
                f"item {index}: reference {tuple(ref.shape)} vs candidate {tuple(cand.shape)}; "
                "both must be encoded from the same inputs with the same processor settings"
            )
        cosines.append(torch.nn.functional.cosine_similarity(ref.float(), cand.float(), dim=-1))
    return cosines


def compare_embeddings(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> dict[str, float]:
    """Drift of a candidate's multi-vector embeddings from the reference's.

    - `token_cosine_*`: over all tokens of all items (long pages weigh more, as they do in MaxSim).
    - `item_cosine_*`: per item, the mean of its token cosines; then mean and min over items, so a
      short query that drifts badly is not hidden by thousands of page tokens.
    - `mse`: mean squared difference per element. Tokens are unit-norm, so for one token
      mse = (2 - 2 cos) / dim: it restates cosine on the scale seed 003 reports.
    - `nan_count` / `inf_count`: non-finite elements in the candidate. They are not filtered out:
      a candidate that produces them gets NaN cosines, which is the honest verdict.
    """
    cosines = token_cosines(reference, candidate)
    all_cosines = torch.cat(cosines)
    item_means = torch.stack([c.mean() for c in cosines])
    ref_flat = torch.cat([r.float().flatten() for r in reference])
    cand_flat = torch.cat([c.float().flatten() for c in candidate])
    return {
        "token_cosine_mean": all_cosines.mean().item(),
        "token_cosine_min": all_cosines.min().item(),
        "token_cosine_p05": torch.quantile(all_cosines, 0.05).item(),
        "item_cosine_mean": item_means.mean().item(),
        "item_cosine_min": item_means.min().item(),
        "mse": (cand_flat - ref_flat).pow(2).mean().item(),
        "nan_count": int(torch.isnan(cand_flat).sum()),
        "inf_count": int(torch.isinf(cand_flat).sum()),
        "n_items": len(cosines),
        "n_tokens": all_cosines.numel(),
    }


def compare_rankings(ref_scores: Any, cand_scores: Any, k: int = 5) -> dict[str, float]:
    """Does the candidate rank pages like the reference? Scores are (queries, pages) MaxSim matrices.

    - `pearson` / `spearman`: agreement of the raw scores over all query-page pairs.
    - `kendall_tau_mean` / `_min`: per query, Kendall's tau-b between the two page orderings.
    - `top1_agreement`: fraction of queries whose best page is the same.
    - `top{k}_overlap`: mean |top-k(ref) ∩ top-k(cand)| / k.
    Ranking agreement, not NDCG: it needs no relevance labels, so it works on any query/page set.
    """
    ref, cand = np.asarray(ref_scores, dtype=np.float64), np.asarray(cand_scores, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"expected two (queries, pages) matrices of one shape, got {ref.shape} and {cand.shape}")
    if not 1 <= k <= ref.shape[1]:
        raise ValueError(f"k={k} must lie between 1 and the number of pages ({ref.shape[1]})")
    taus = np.array([stats.kendalltau(r, c).statistic for r, c in zip(ref, cand)])
    top_ref = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top_cand = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    overlap = [len(set(r) & set(c)) / k for r, c in zip(top_ref, top_cand)]
    return {
        "pearson": stats.pearsonr(ref.ravel(), cand.ravel()).statistic,
        "spearman": stats.spearmanr(ref.ravel(), cand.ravel()).statistic,
        "kendall_tau_mean": float(taus.mean()),
        "kendall_tau_min": float(taus.min()),
        "top1_agreement": float((top_ref[:, 0] == top_cand[:, 0]).mean()),
        f"top{k}_overlap": float(np.mean(overlap)),
    }


# --- where the error grows ------------------------------------------------------------------------


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.language_model.layers


def _capture_layer_outputs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run the model once and keep every decoder layer's output hidden state (batch, tokens, hidden)."""
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in _decoder_layers(model)]
    try:
        with torch.inference_mode():
            model(**{name: value.to(model_device(model)) for name, value in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    return captured


def layer_errors(
    reference_model: torch.nn.Module, candidate_model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
) -> pd.DataFrame:
    """Per decoder layer of the text tower: how far the candidate's hidden states are from the reference's.

    Hidden states are the decoder layers' outputs (forward hooks), compared on attended tokens only.
    For layers 0-2 on pages this is before the deepstack visual features are added, i.e. what the
    (quantized) layer itself produced. Columns:
    - `relative_l2`: ||h_cand - h_ref|| / ||h_ref|| over all attended tokens. Qwen's hidden states
      carry a few huge "massive activation" entries, which dominate this norm;
    - `token_relative_l2_median`: the same per token, median over tokens, which those entries do not
      dominate;
    - `cosine_mean`: mean per-token cosine of the hidden states.
    All layers are kept in memory for the reference run only (one batch), so keep batches small.
    """
    if len(_decoder_layers(reference_model)) != len(_decoder_layers(candidate_model)):
        raise ValueError("reference and candidate have different numbers of decoder layers")
    keep = batch["attention_mask"].bool()
    reference = _capture_layer_outputs(reference_model, batch)
    candidate = _capture_layer_outputs(candidate_model, batch)
    rows = []
    for layer, (ref, cand) in enumerate(zip(reference, candidate)):
        ref = ref[keep.to(ref.device)].float()
        cand = cand[keep.to(cand.device)].to(ref.device).float()
        diff = cand - ref
        rows.append(
            {
                "layer": layer,
                "relative_l2": (diff.norm() / ref.norm()).item(),
                "token_relative_l2_median": (diff.norm(dim=-1) / ref.norm(dim=-1)).median().item(),
                "cosine_mean": torch.nn.functional.cosine_similarity(cand, ref, dim=-1).mean().item(),
            }
        )
    return pd.DataFrame(rows)


@torch.no_grad()
def projection_errors(
    reference_model: torch.nn.Module, candidate_model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
) -> pd.DataFrame:
    """Per decoder Linear of the text tower (layer x projection): the candidate layer's own error.

    While the reference runs `batch`, each decoder Linear's input is also fed to the candidate's layer
    of the same name, so every projection is judged on the same (reference) input: its error is its
    own, not what earlier layers passed on (`layer_errors` shows that accumulation). `relative_l2` is
    ||y_cand - y_ref|| / ||y_ref|| over attended tokens. Nothing is kept between layers."""
    keep = batch["attention_mask"].bool()
    references = dict(_decoder_linears(reference_model))
    candidates = dict(_decoder_linears(candidate_model))
    rows = []

    def compare(name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            ref = output[keep.to(output.device)].float()
            cand = candidates[name](inputs[0].to(model_device(candidate_model)))
            diff = cand[keep.to(cand.device)].float().to(ref.device) - ref
            layer, projection = name.split(".")[1], name.rsplit(".", 1)[1]
            rows.append({"layer": int(layer), "projection": projection, "relative_l2": (diff.norm() / ref.norm()).item()})
        return hook

    handles = [module.register_forward_hook(compare(name)) for name, module in references.items()]
    try:
        with torch.inference_mode():
            reference_model(**{name: value.to(model_device(reference_model)) for name, value in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    return pd.DataFrame(rows)


def _decoder_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(`layers.N.<module>.<projection>`, layer) for the decoder's projections, float or packed."""
    return [(name, module) for name, module in model.language_model.named_modules()
            if name.startswith("layers.") and name.endswith("_proj")]


# --- the notebook's tables ------------------------------------------------------------------------


def fidelity_report(
    reference: Variant,
    candidates: Mapping[str, Variant],
    queries: Sequence[str],
    images: Sequence[Image.Image],
    batch_size: int,
    *,
    reference_name: str = "bf16",
    k: int = 5,
    layer_error_items: int = 4,
) -> dict[str, pd.DataFrame]:
    """Every fidelity table the notebook shows, for each candidate against the reference.

    Returns:
    - `summary`: one row per variant: query/page cosines and MSE, NaN/Inf counts, ranking agreement,
      and `passes` (every token-cosine mean > 0.95 and no NaN/Inf: seed 003's bar);
    - `embeddings`: one row per (variant, kind) with all of `compare_embeddings`;
    - `layer_errors`: long format (variant, kind, layer, ...) on the first `layer_error_items`
      queries and pages;
    - `token_cosine`: long format (variant, kind, item, cosine), one row per token, for plots;
    - `scores`: one row per (query, page) pair, one column of MaxSim scores per variant.
    The reference is encoded once; candidates are processed one after another, in the same batches
    as the reference, so bf16 padding effects (a token's value shifts slightly with its batch) are
    the same on both sides and not counted as quantization error.
    """
    ref_model, ref_processor = reference
    ref_queries = encode_queries(ref_model, ref_processor, queries, batch_size)
    ref_pages = encode_pages(ref_model, ref_processor, images, batch_size)
    ref_scores = _maxsim(ref_queries, ref_pages, model_device(ref_model))
    scores = _score_table(ref_scores, reference_name)
    embedding_rows, layer_tables, cosine_tables, summary_rows = [], [], [], []
    for name, (model, processor) in candidates.items():
        cand_queries = encode_queries(model, processor, queries, batch_size)
        cand_pages = encode_pages(model, processor, images, batch_size)
        per_kind = {
            "query": compare_embeddings(ref_queries, cand_queries),
            "page": compare_embeddings(ref_pages, cand_pages),
        }
        embedding_rows += [{"variant": name, "kind": kind, **values} for kind, values in per_kind.items()]
        cosine_tables += [
            _cosine_table(name, "query", token_cosines(ref_queries, cand_queries)),
            _cosine_table(name, "page", token_cosines(ref_pages, cand_pages)),
        ]
        cand_scores = _maxsim(cand_queries, cand_pages, model_device(model))
        scores[name] = cand_scores.numpy().ravel()
        summary_rows.append(_summary_row(name, per_kind, compare_rankings(ref_scores, cand_scores, k=k)))
        layer_tables += [
            layer_errors(ref_model, model, ref_processor.process_queries(list(queries[:layer_error_items])))
            .assign(variant=name, kind="query"),
            layer_errors(ref_model, model, ref_processor.process_images(list(images[:layer_error_items])))
            .assign(variant=name, kind="page"),
        ]
    return {
        "summary": pd.DataFrame(summary_rows),
        "embeddings": pd.DataFrame(embedding_rows),
        "layer_errors": pd.concat(layer_tables, ignore_index=True)[
            ["variant", "kind", "layer", "relative_l2", "token_relative_l2_median", "cosine_mean"]
        ],
        "token_cosine": pd.concat(cosine_tables, ignore_index=True),
        "scores": scores,
    }


def _maxsim(queries: list[torch.Tensor], pages: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """MaxSim scores; all NaN for a variant with non-finite embeddings (`colquant.score` refuses
    them; the report counts them in nan_count/inf_count and fails the variant instead)."""
    if not all(bool(torch.isfinite(item).all()) for item in [*queries, *pages]):
        return torch.full((len(queries), len(pages)), float("nan"))
    return score(queries, pages, device=device).cpu()


def _score_table(ref_scores: torch.Tensor, reference_name: str) -> pd.DataFrame:
    n_queries, n_pages = ref_scores.shape
    query, page = np.meshgrid(np.arange(n_queries), np.arange(n_pages), indexing="ij")
    return pd.DataFrame({"query": query.ravel(), "page": page.ravel(), reference_name: ref_scores.numpy().ravel()})


def _cosine_table(variant: str, kind: str, cosines: list[torch.Tensor]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "variant": variant,
            "kind": kind,
            "item": np.repeat(np.arange(len(cosines)), [len(c) for c in cosines]),
            "cosine": torch.cat(cosines).numpy(),
        }
    )


def _summary_row(name: str, per_kind: dict[str, dict[str, float]], ranking: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name}
    for kind, values in per_kind.items():
        for metric in ("token_cosine_mean", "token_cosine_min", "token_cosine_p05", "item_cosine_mean", "mse"):
            row[f"{kind}_{metric}"] = values[metric]
    row["nan_count"] = sum(values["nan_count"] for values in per_kind.values())
    row["inf_count"] = sum(values["inf_count"] for values in per_kind.values())
    row.update(ranking)
    row["passes"] = bool(
        all(values["token_cosine_mean"] > COSINE_THRESHOLD for values in per_kind.values())
        and row["nan_count"] == 0
        and row["inf_count"] == 0
    )
    return row


# --- plots ----------------------------------------------------------------------------------------


def plot_token_cosine(token_cosine: pd.DataFrame, threshold: float = COSINE_THRESHOLD, *,
                      palette: Mapping[str, Any] | None = None) -> Figure:
    """Cumulative distribution of per-token cosine vs the reference, per variant, queries and pages apart.

    An ECDF rather than a histogram: cosines pile up near 1, and what matters is the tail on the left.
    """
    kinds = list(dict.fromkeys(token_cosine["kind"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        sns.ecdfplot(data=token_cosine[token_cosine["kind"] == kind], x="cosine", hue="variant", ax=ax,
                     **hue_style(token_cosine["variant"], palette))
        ax.axvline(threshold, color="grey", linestyle="--", linewidth=1)
        ax.set(title=f"{kind} tokens", xlabel="cosine to reference", ylabel="fraction of tokens")
    legend_outside(axes[0])
    fig.tight_layout()
    return fig


def plot_layer_errors(layer_errors_table: pd.DataFrame, metric: str = "relative_l2", *,
                      palette: Mapping[str, Any] | None = None) -> Figure:
    """Error of each decoder layer's output vs the reference (log scale), per variant, queries and pages apart."""
    kinds = list(dict.fromkeys(layer_errors_table["kind"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        sns.lineplot(
            data=layer_errors_table[layer_errors_table["kind"] == kind], x="layer", y=metric, hue="variant",
            marker="o", ax=ax, **hue_style(layer_errors_table["variant"], palette),
        )
        ax.set_yscale("log")
        ax.set(title=f"{kind} inputs", xlabel="decoder layer", ylabel=metric)
    legend_outside(axes[0])
    fig.tight_layout()
    return fig


def plot_score_scatter(ref_scores: Any, cand_scores: Mapping[str, Any], *,
                       palette: Mapping[str, Any] | None = None) -> Figure:
    """Candidate MaxSim score against the reference's for every query-page pair, one panel per variant.

    Points on the diagonal mean unchanged scores; what reorders pages is scatter across it.
    """
    ref = np.asarray(ref_scores, dtype=np.float64).ravel()
    colours = hue_style(cand_scores, palette)["palette"]
    fig, axes = plt.subplots(1, len(cand_scores), figsize=(4.5 * len(cand_scores), 4.5), squeeze=False)
    for ax, name in zip(axes[0], colours):
        ax.scatter(ref, np.asarray(cand_scores[name], dtype=np.float64).ravel(), s=4, alpha=0.4, color=colours[name])
        low, high = np.nanmin(ref), np.nanmax(ref)
        ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
        ax.set(title=name, xlabel="reference MaxSim", ylabel=f"{name} MaxSim")
    fig.tight_layout()
    return fig
