"""The quality-memory frontier: every (weight setting, index setting) as NDCG@5 against total bytes.

For a GPU of B GiB serving a corpus of N pages, what costs memory is the model on the GPU and the page
index. Notebook 07 measured every variant's NDCG@5 with every index setting and the index's bytes
per page; this module adds the model's bytes, measured on the loaded variant (`measure_model_bytes`:
its tensors on the profile's device as loaded, not a prediction), and for each corpus size N

    total bytes = model bytes + N x index bytes per page,

the index extrapolated linearly from the measured bytes per page (an index is a list of pages). From
that table: the Pareto front per corpus size (`pareto_front`: no other pair has NDCG@5 at least as high
for at most the bytes) and, per memory budget and corpus size, the best pair that fits
(`recommendations`). Activations while encoding and scoring are not counted: notebook 06 measures
those per batch size; the frontier is about what must stay resident.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

GIB = 2**30
FRONTIER_TABLE = "frontier.csv"
FRONT_TABLE = "frontier_front.csv"
RECOMMENDATIONS_TABLE = "frontier_recommendations.csv"
MODEL_BYTES_TABLE = "frontier_model_bytes.csv"
SENSITIVITY_TABLE = "frontier_sensitivity.csv"
SENSITIVITY_ITEMS = 4  # pages the per-layer sensitivity runs on, as notebook 04's per-layer errors
NOTHING_FITS = "nothing fits"


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, each storage counted once (tied weights share one)."""
    storages: dict[tuple[str, int], int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def measure_model_bytes(profile: dict[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """The variant's memory once loaded on the profile's device: its tensors' bytes as they are held
    (packed layers packed, no BF16 copies or kernel workspaces: `accelerate=False`), and on CUDA also
    the allocator's growth while loading, as a check."""
    from colquant.research import workspace
    from colquant.retriever.checkpoint import resolve_device

    device = resolve_device(profile["model"]["device"])
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    model, _ = workspace.load_variant(profile, checkpoint, accelerate=False)  # a W4A8 run: its checkpoint, FP8 activations
    measured = {"model_bytes": tensor_bytes(model), "device": str(device),
                "allocated_bytes": None if before is None else torch.cuda.memory_allocated(device) - before}
    del model
    return measured


def frontier_table(compression: pd.DataFrame, model_bytes: Mapping[str, float], corpus_pages: Sequence[int]
                   ) -> pd.DataFrame:
    """One row per (variant, index setting, corpus size): NDCG@5 (notebook 07's mean over tasks), model
    bytes, index bytes for that many pages and their total. Every variant of `compression` needs a
    measured model size."""
    unmeasured = sorted(set(compression["variant"]) - set(model_bytes.keys()))
    if unmeasured:
        raise ValueError(f"no measured model bytes for {unmeasured}: measure every variant the compression grid holds")
    rows = []
    for pages in corpus_pages:
        grid = compression[["variant", "setting", "ndcg_at_5", "bytes_per_page"]].copy()
        grid["model_bytes"] = grid["variant"].map(model_bytes).astype(float)
        grid["pages"] = pages
        grid["index_bytes"] = grid["bytes_per_page"] * pages
        grid["total_bytes"] = grid["model_bytes"] + grid["index_bytes"]
        rows.append(grid)
    return pd.concat(rows, ignore_index=True)


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Per corpus size, the rows no other row beats: none has NDCG@5 at least as high for at most the
    total bytes with one of the two strictly better. Sorted by corpus size, then total bytes."""
    fronts = []
    for _, group in table.groupby("pages", sort=True):
        ndcg, total = group["ndcg_at_5"].to_numpy(), group["total_bytes"].to_numpy()
        dominated = [bool(((ndcg >= n) & (total <= t) & ((ndcg > n) | (total < t))).any()) for n, t in zip(ndcg, total)]
        fronts.append(group[[not d for d in dominated]].sort_values("total_bytes"))
    return pd.concat(fronts, ignore_index=True)


def recommendations(table: pd.DataFrame, budgets_gb: Sequence[float]) -> pd.DataFrame:
    """Per (budget, corpus size): the pair with the highest NDCG@5 whose total bytes fit in the budget
    (GiB), the smaller total among equals; `fit` says `nothing fits` where no pair does."""
    rows = []
    for budget in budgets_gb:
        for pages, group in table.groupby("pages", sort=True):
            fitting = group[group["total_bytes"] <= budget * GIB]
            row: dict[str, Any] = {"budget_gb": budget, "pages": pages}
            if fitting.empty:
                smallest = group["total_bytes"].min()
                rows.append({**row, "fit": NOTHING_FITS, "variant": None, "setting": None, "ndcg_at_5": None,
                             "total_bytes": None, "smallest_total_gib": smallest / GIB})
                continue
            best = fitting.sort_values(["ndcg_at_5", "total_bytes"], ascending=[False, True]).iloc[0]
            rows.append({**row, "fit": "fits", "variant": best["variant"], "setting": best["setting"],
                         "ndcg_at_5": best["ndcg_at_5"], "total_bytes": best["total_bytes"],
                         "smallest_total_gib": group["total_bytes"].min() / GIB})
    return pd.DataFrame(rows)


def model_bytes_table(profile: dict[str, Any], variants: Mapping[str, Path]) -> pd.DataFrame:
    """Per variant (BF16 first): what its weights are, whether a fast kernel runs them, its checkpoint's
    weight files and its measured bytes once loaded (`measure_model_bytes`)."""
    from colquant.quantize.weight_formats import kernel_path, weight_format
    from colquant.research import workspace
    from colquant.research.notebook import checkpoint_bytes
    from colquant.retriever.checkpoint_files import read_variant_metadata, variant_checkpoint

    rows = []
    for name, path in variants.items():
        if name == workspace.BASELINE:
            weights, fast = "BF16", True
        else:
            settings = read_variant_metadata(path)["settings"]
            weights, fast = weight_format(settings), kernel_path(settings)[0]
        measured = measure_model_bytes(profile, path)
        weight_files = variant_checkpoint(path)[0]  # a W4A8 run holds none: its checkpoint's
        rows.append({"variant": name, "weights": weights, "fast_kernel": fast, "checkpoint_bytes": checkpoint_bytes(weight_files),
                     **measured})
    return pd.DataFrame(rows)


def low_bit_variants(profile: dict[str, Any], variants: Mapping[str, Path], max_bits: int = 3) -> dict[str, Path]:
    """The quantized variants with layers of `max_bits` bits or fewer (uniform W2/W3, AutoScheme with such
    options): the ones whose per-layer sensitivity notebook 08 maps."""
    from colquant.research import workspace
    from colquant.retriever.checkpoint_files import read_variant_metadata

    chosen = {}
    for name, path in variants.items():
        if name == workspace.BASELINE:
            continue
        settings = read_variant_metadata(path)["settings"]
        widths = settings.get("options") or [settings["bits"]]
        if settings["method"] != "fp8-dynamic" and min(widths) <= max_bits:
            chosen[name] = path
    return chosen


def sensitivity_table(profile: dict[str, Any], reference: Path, candidates: Mapping[str, Path],
                      images: Sequence[Any]) -> pd.DataFrame:
    """Each candidate's own error per decoder layer and projection (`fidelity.projection_errors`) on a
    batch of pages (what the index is built from) against BF16, with the width each projection has
    (AutoScheme's choice, or the variant's one width)."""
    from colquant.evaluate import fidelity
    from colquant.research import workspace
    from colquant.retriever.checkpoint_files import read_variant_metadata

    # transformers' own layers: the hooks need them
    ref_model, ref_processor = workspace.load_variant(profile, reference, accelerate=False)
    batch = ref_processor.process_images(list(images))
    tables = []
    for name, path in candidates.items():
        model, _ = workspace.load_variant(profile, path, accelerate=False)
        metadata = read_variant_metadata(path)
        layer_bits = metadata.get("autoscheme", {}).get("layer_bits", {})
        errors = fidelity.projection_errors(ref_model, model, batch).assign(variant=name)
        names = [f"layers.{row.layer}.{_module_of(row.projection)}.{row.projection}" for row in errors.itertuples()]
        errors["bits"] = [layer_bits.get(name, metadata["settings"]["bits"]) for name in names]
        tables.append(errors)
        del model
    columns = ["variant", "layer", "projection", "bits", "relative_l2"]
    return pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)


def _module_of(projection: str) -> str:
    return "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def frontier_report(results: Path) -> str:
    """REPORT.md's section: the best pair per budget and corpus size, and the Pareto front (notebook 08)."""
    title = "## The quality-memory frontier: weights x index against total bytes\n\n"
    path = results / RECOMMENDATIONS_TABLE
    if not path.exists():
        return title + "_No frontier yet: run `notebooks/08_frontier.ipynb` (or `python -m colquant run <profile>`)._"
    picks = pd.read_csv(path)
    front = pd.read_csv(results / FRONT_TABLE)
    front = front.assign(total_gib=front["total_bytes"] / GIB)[["pages", "variant", "setting", "ndcg_at_5", "total_gib"]]
    return (title + "Total bytes = the model's tensors on the GPU (measured on the loaded variant) + the page index "
            "of a corpus of that many pages (measured bytes per page x pages). Best pair per memory budget (GiB):\n\n"
            + picks.to_markdown(index=False, floatfmt=".4g") + "\n\nThe Pareto front per corpus size:\n\n"
            + front.to_markdown(index=False, floatfmt=".4g"))
