"""colquant.research.notebook (the setup every notebook calls), colquant.research.interpret (the sentences after each
result) and the committed notebooks' shape: no widget state, no stale parameters cell."""

import os
import random

import matplotlib
import nbformat
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from colquant.evaluate import plots
from colquant.research import interpret, notebook, pipeline, workspace

matplotlib.use("Agg")
NOTEBOOKS = sorted(pipeline.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
RTN, W4 = "w4a16-g128-sym-rtn", "w4a16-g128-sym-pile10k-seqlen512-iters200"


@pytest.fixture
def book(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    return notebook.setup("params/tiny.yaml", seed=3)


def test_setup_loads_the_profile_seeds_and_gives_every_variant_its_colour(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    shown = []
    monkeypatch.setattr(notebook, "display", shown.append)
    book = notebook.setup("params/tiny.yaml", seed=3)
    assert "random weights" in shown[0].data  # the notice, displayed first
    assert book.profile["profile"] == "tiny" and book.results == tmp_path / "tiny" / "results" and book.results.is_dir()
    first = random.random(), np.random.rand()
    notebook.setup("params/tiny.yaml", seed=3, notice=False)
    assert (random.random(), np.random.rand()) == first
    palette = book.palette(["fp8-lm"])
    assert {"bf16", "fp8-lm", *workspace.expected_variants(book.profile)} == set(palette)
    assert len(set(palette.values())) == len(palette)


def test_show_saves_and_displays_the_figure_as_png_with_the_random_weights_note(book, monkeypatch):
    shown = []
    monkeypatch.setattr(notebook, "display", shown.append)
    figure = Figure()  # no pyplot: IPython has no PNG formatter for it unless the inline backend is loaded
    figure.subplots().plot([0, 1], [0, 1])
    assert book.show(figure, "00_line") is None  # a cell ending with it must not display the figure again
    assert shown[0].format == "png" and shown[0].data == (book.plots / "00_line.png").read_bytes()
    assert (book.plots / "00_line.png").stat().st_size > 0
    assert plots.RANDOM_WEIGHTS_NOTE in [text.get_text() for text in figure.texts]
    assert not list(book.plots.glob(".*partial"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebooks_carry_no_widget_state_and_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata
    tags = [cell.metadata.get("tags", []) for cell in nb.cells]
    assert not any("injected-parameters" in cell_tags for cell_tags in tags)
    (parameters,) = [cell for cell, cell_tags in zip(nb.cells, tags) if "parameters" in cell_tags]
    names = [line.split("=")[0].strip() for line in parameters.source.splitlines()]
    assert names == (["profile_path", "seqlen"] if path.stem in ("02_calibration", "03_quantization") else ["profile_path"])
    assert f'profile_path = "{pipeline.NOTEBOOK_DEFAULT_PROFILE}"' in parameters.source
    assert sum("notebook.setup(profile_path)" in cell.source for cell in nb.cells) == 1


def test_a_headless_run_stores_no_widget_state(tmp_path, monkeypatch):
    source = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), disable=False):\n    pass")])
    source.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(source, tmp_path / "99_bar.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", tmp_path)
    step = pipeline.Step("99_bar", {}, tmp_path / "out.ipynb", (), (), ())
    pipeline._execute(step, "bar")
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert executed.cells[0].outputs and "widgets" not in executed.metadata


def summary(**overrides):
    rows = {
        W4: {"query_token_cosine_mean": 0.98, "page_token_cosine_mean": 0.99, "top5_overlap": 0.95, "passes": True},
        RTN: {"query_token_cosine_mean": np.nan, "page_token_cosine_mean": 0.97, "top5_overlap": 0.90, "passes": False},
    }
    for name, values in overrides.items():
        rows[name].update(values)
    return pd.DataFrame([{"variant": name, **values} for name, values in rows.items()])


def test_fidelity_prose_names_the_closest_variant_and_never_counts_nan_as_a_pass():
    text = interpret.fidelity_summary(summary(), threshold=0.95)
    assert text.startswith(f"Closest to BF16: `{W4}`, mean token cosine 0.9800 (queries) and 0.9900 (pages)")
    assert f"Below the 0.95 threshold or with NaN/Inf: `{RTN}`." in text
    allpass = interpret.fidelity_summary(summary(**{RTN: {"query_token_cosine_mean": 0.97, "passes": True}}), 0.95)
    assert "Every variant passes the 0.95 threshold" in allpass and f"Furthest: `{RTN}`" in allpass


def test_the_sweep_prose_compares_at_the_largest_batch_every_variant_ran():
    rows = [{"variant": v, "kind": "page", "batch_size": b, "status": "ok" if (v, b) != (RTN, 8) else "oom",
             "peak_memory_mib": m * b, "items_per_s": s * b, "memory_kind": "process_rss"}
            for v, m, s in (("bf16", 1000, 2.0), (RTN, 400, 1.0)) for b in (1, 4, 8)]
    reference = interpret.reference_rows(pd.DataFrame(rows))
    assert set(reference["batch_size"]) == {4}
    text = interpret.sweep(reference)
    assert f"pages at batch 4 (process_rss), against bf16's 4,000 MiB and 8 pages/s: `{RTN}` 0.40× memory, 0.50× throughput" in text
    assert interpret.sweep_rows(pd.DataFrame(rows)).endswith(f"out of memory: `{RTN}` pages from batch 8.")


def test_the_sweep_prose_labels_a_w4a8_run_on_cpu_as_its_dequantized_reference():
    w4a8 = "w4a8-g128-sym-pile10k-seqlen1024-iters20"
    rows = [{"variant": v, "kind": "query", "batch_size": 4, "status": "ok", "peak_memory_mib": 100.0,
             "items_per_s": 10.0, "memory_kind": "process_rss", "device": device}
            for v, device in (("bf16", "cpu"), (W4, "cpu"), (w4a8, "cpu"))]
    text = interpret.sweep(pd.DataFrame(rows))
    assert f"`{w4a8}` (W4A8's dequantized reference on CPU: its arithmetic, not its kernel's speed or memory)" in text
    assert f"`{W4}` 1.00× memory" in text
    on_gpu = interpret.sweep(pd.DataFrame([dict(row, device="cuda") for row in rows]))
    assert "dequantized reference" not in on_gpu


def test_the_ndcg_prose_ranks_variants_by_their_mean():
    from colquant.evaluate.evaluation import change_counts, ndcg_table

    results = pd.DataFrame([{"task": task, "language": "eng", "variant": variant, "ndcg_at_5": score}
                            for task, scores in (("A", (0.8, 0.78, 0.7)), ("B", (0.6, 0.61, 0.5)))
                            for variant, score in zip(("bf16", W4, RTN), scores)])
    table = ndcg_table(results)
    text = interpret.ndcg(table, change_counts(table))
    assert text.startswith(f"Over 2 tasks, bf16 scores a mean NDCG@5 of 0.7000; the best quantized variant, `{W4}`, 0.6950 (-0.71%).")
    assert f"The lowest is `{RTN}` at 0.6000 (-14.29%)." in text and f"`{W4}` is worse than bf16 on 1 of 2 tasks." in text


def test_setup_quiets_library_logs_through_the_environment_but_keeps_a_users_choice(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("AR_LOG_LEVEL", raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    notebook.setup("params/tiny.yaml", notice=False)
    assert os.environ["AR_LOG_LEVEL"] == "ERROR" and os.environ["TRANSFORMERS_VERBOSITY"] == "info"


def test_the_budget_prose_names_the_fastest_fit_per_kind_and_says_when_nothing_fits():
    table = pd.DataFrame([
        {"budget_gb": 8, "variant": "bf16", "kind": "page", "fit": "does not fit", "batch_size": pd.NA, "items_per_s": np.nan},
        {"budget_gb": 8, "variant": RTN, "kind": "page", "fit": "fits", "batch_size": 4, "items_per_s": 2.5},
        {"budget_gb": 8, "variant": "bf16", "kind": "query", "fit": "does not fit", "batch_size": pd.NA, "items_per_s": np.nan},
        {"budget_gb": 80, "variant": "bf16", "kind": "page", "fit": "fits", "batch_size": 64, "items_per_s": 9.0},
    ])
    text = interpret.budgets(table)
    assert f"- pages: 1 of 2 variants fit; the fastest is `{RTN}` at batch 4, 2.5 pages/s." in text
    assert "- queries: no variant fits at any measured batch size." in text and "bind only" not in text


def test_every_registered_metric_is_recorded_by_the_notebook_it_names():
    from colquant.evaluate import metrics

    constants = {metric.name: name for name, metric in vars(metrics).items() if isinstance(metric, metrics.Metric)}
    for metric in metrics.REGISTRY.values():
        source = "\n".join(cell.source for cell in nbformat.read(pipeline.NOTEBOOKS_DIR / f"{metric.notebook}.ipynb",
                                                                  as_version=4).cells)
        assert f"book.record(metrics.{constants[metric.name]}," in source, (metric.name, metric.notebook)
