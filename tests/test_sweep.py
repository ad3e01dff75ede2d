"""Batch-size sweeps on the tiny model: rows, OOM handling, resumption, the results file, the tables.

No timing is asserted: only that the machinery measures, records and resumes correctly.
"""

import json
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from colquant.evaluate import sweep
from colquant.retriever.processing import ColQwen3Processor

QUERY_TOKENS = 8


@pytest.fixture(scope="module")
def variant(tiny_model, tiny_path):
    """The tiny model with a processor whose page budget keeps page batches small (63 visual tokens)."""
    return tiny_model[0], ColQwen3Processor.from_pretrained(tiny_path, max_num_visual_tokens=64)


def sweep_once(variant, path, batch_sizes=(1, 2), kind="query", name="bf16", repeats=1, weights="tiny-weights",
               min_time_s=0.0):
    """One sweep; `min_time_s=0` keeps the count of calls exactly warm-up + `repeats` per batch size."""
    model, processor = variant
    return sweep.run_sweep(
        name, model, processor, kind=kind, batch_sizes=list(batch_sizes), query_tokens=QUERY_TOKENS,
        repeats=repeats, results_path=path, device="cpu", warmup=1, weights_fingerprint=weights,
        min_time_s=min_time_s,
    )


class EncodeCalls:
    """Stands in for `sweep.encode_batch`: records each batch size and can fail at chosen ones."""

    def __init__(self, real) -> None:
        self.real, self.seen, self.failures = real, [], {}

    def fail_at(self, batch_size: int, error: Exception) -> None:
        self.failures[batch_size] = error

    def __call__(self, model, batch):
        size = batch["input_ids"].shape[0]
        self.seen.append(size)
        if size in self.failures:
            raise self.failures[size]
        return self.real(model, batch)


@pytest.fixture
def calls(monkeypatch) -> EncodeCalls:
    encode = EncodeCalls(sweep.encode_batch)
    monkeypatch.setattr(sweep, "encode_batch", encode)
    return encode


def test_synthetic_queries_have_exactly_the_requested_tokens(variant):
    batch = sweep.synthetic_queries(variant[1], batch_size=3, query_tokens=32)
    assert batch["attention_mask"].shape == (3, 42) and batch["attention_mask"].all()


def test_synthetic_page_fills_the_visual_token_budget(variant):
    processor = variant[1]
    assert processor.visual_tokens(sweep.synthetic_page(64)) == 63
    assert sweep.synthetic_page(1280).size == (1024, 1280)  # 32 x 40 tokens of 32 px, as the 4B's pages


@pytest.mark.parametrize("kind", ["query", "page"])
def test_sweep_records_one_row_per_batch_size(variant, tmp_path, kind):
    rows = sweep_once(variant, tmp_path / "sweep.jsonl", kind=kind)
    assert list(rows["batch_size"]) == [1, 2] and (rows["status"] == "ok").all()
    assert (rows["items_per_s"] > 0).all() and (rows["tokens_per_s"] > rows["items_per_s"]).all()
    assert (rows["latency_mean_ms"] > 0).all() and (rows["peak_memory_mib"] > 0).all()
    assert (rows["peak_increase_mib"] >= 0).all() and (rows["memory_kind"] == "process_rss").all()
    expected_tokens = QUERY_TOKENS + 10 if kind == "query" else 63 + 29  # visual tokens + page prompt
    assert (rows["tokens_per_item"] == expected_tokens).all()
    stored = sweep.load_results(tmp_path / "sweep.jsonl")
    pd.testing.assert_frame_equal(stored, rows)
    devices = sweep.devices_of(tmp_path / "sweep.jsonl")  # what the report names beside a quoted speed
    assert list(devices) == [(rows.loc[0, "variant"], kind)] and devices[(rows.loc[0, "variant"], kind)].startswith("cpu (")


def test_oom_gives_an_oom_row_then_skips_larger_batches(variant, tmp_path, calls):
    calls.fail_at(2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    rows = sweep_once(variant, tmp_path / "sweep.jsonl", batch_sizes=(4, 1, 2, 8))
    assert list(rows["batch_size"]) == [1, 2, 4, 8]
    assert list(rows["status"]) == ["ok", "oom", "skipped_after_oom", "skipped_after_oom"]
    assert rows.loc[0, "items_per_s"] > 0 and rows.loc[1:, "items_per_s"].isna().all()
    assert "out of memory" in rows.loc[1, "error"]
    assert 4 not in calls.seen and 8 not in calls.seen
    assert list(sweep.load_results(tmp_path / "sweep.jsonl")["status"]) == list(rows["status"])


def test_cpu_allocator_failure_counts_as_oom(variant, tmp_path, calls):
    calls.fail_at(2, RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    rows = sweep_once(variant, tmp_path / "sweep.jsonl")
    assert list(rows["status"]) == ["ok", "oom"]


def test_other_errors_propagate_and_finished_rows_stay(variant, tmp_path, calls):
    calls.fail_at(2, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        sweep_once(variant, tmp_path / "sweep.jsonl")
    assert list(sweep.load_results(tmp_path / "sweep.jsonl")["batch_size"]) == [1]


def test_rerun_skips_finished_rows(variant, tmp_path, calls):
    path = tmp_path / "sweep.jsonl"
    sweep_once(variant, path, batch_sizes=(1, 2))
    assert calls.seen == [1, 1, 2, 2]  # warm-up + one timed run each
    rows = sweep_once(variant, path, batch_sizes=(1, 2, 4))
    assert calls.seen == [1, 1, 2, 2, 4, 4] and list(rows["status"]) == ["ok"] * 3
    sweep_once(variant, path, batch_sizes=(1, 2, 4), name="w4a16")  # another variant is not "finished"
    assert calls.seen[6:] == [1, 1, 2, 2, 4, 4]
    assert len(sweep.load_results(path)) == 6


def test_rerun_after_oom_does_not_retry_larger_batches(variant, tmp_path, calls):
    path = tmp_path / "sweep.jsonl"
    calls.fail_at(2, torch.OutOfMemoryError("CUDA out of memory"))
    sweep_once(variant, path, batch_sizes=(1, 2, 4))
    seen_before = len(calls.seen)
    rows = sweep_once(variant, path, batch_sizes=(1, 2, 4))
    assert len(calls.seen) == seen_before
    assert list(rows["status"]) == ["ok", "oom", "skipped_after_oom"]
    assert len(sweep.load_results(path)) == 3  # the skipped row was replaced, not duplicated


def test_results_file_is_complete_json_after_each_row(variant, tmp_path, monkeypatch):
    path = tmp_path / "sweep.jsonl"
    real = sweep.encode_batch
    observed = {}

    def checking(model, batch):
        size = batch["input_ids"].shape[0]
        lines = path.read_text().splitlines() if path.exists() else []
        observed[size] = [json.loads(line)["batch_size"] for line in lines]  # every line parses
        return real(model, batch)

    monkeypatch.setattr(sweep, "encode_batch", checking)
    sweep_once(variant, path, batch_sizes=(1, 2, 4))
    assert observed == {1: [], 2: [1], 4: [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.jsonl"]  # no staging files left behind


def test_a_different_workload_in_the_same_file_is_measured_again_and_replaces_the_old_row(variant, tmp_path, calls):
    model, processor = variant
    path = tmp_path / "sweep.jsonl"
    sweep_once(variant, path, batch_sizes=(1,))
    sweep.run_sweep("bf16", model, processor, kind="query", batch_sizes=[1], query_tokens=QUERY_TOKENS + 1,
                    repeats=1, results_path=path, device="cpu", weights_fingerprint="tiny-weights", min_time_s=0)
    assert calls.seen == [1, 1, 1, 1]
    assert list(sweep.load_results(path)["tokens_per_item"]) == [QUERY_TOKENS + 1 + 10]


@pytest.mark.parametrize("change", [{"repeats": 2}, {"weights": "requantized-weights"}, {"min_time_s": 1e-9}])
def test_rows_measured_with_other_repeats_or_weights_are_measured_again(variant, tmp_path, calls, change):
    """Issue 8: changing sweep.repeats (or re-quantizing) reused the old rows, even with --force."""
    path = tmp_path / "sweep.jsonl"
    sweep_once(variant, path, batch_sizes=(1, 2))
    rows = sweep_once(variant, path, batch_sizes=(1, 2), **change)
    assert len(calls.seen) == 4 + 2 * (1 + change.get("repeats", 1))
    assert list(rows["repeats"]) == [change.get("repeats", 1)] * 2 and len(sweep.load_results(path)) == 2


def test_a_sweep_killed_half_way_resumes_where_it_stopped_and_finishes(variant, tmp_path, calls):
    path = tmp_path / "sweep.jsonl"
    calls.fail_at(4, KeyboardInterrupt())  # the process is killed while measuring the third size
    with pytest.raises(KeyboardInterrupt):
        sweep_once(variant, path, batch_sizes=(1, 2, 4, 8))
    assert list(sweep.load_results(path)["batch_size"]) == [1, 2]
    calls.failures.clear()
    calls.seen.clear()
    rows = sweep_once(variant, path, batch_sizes=(1, 2, 4, 8))
    assert calls.seen == [4, 4, 8, 8] and list(rows["status"]) == ["ok"] * 4


def no_encoding(model, batch) -> None:
    """The model's part of a call left out, so the stand-in's sleeps alone set each call's duration."""


class SlowCalls(EncodeCalls):
    """Sleeps the next of `delays` seconds per call: a controlled duration per call."""

    def __init__(self, real, delays: list[float]) -> None:
        super().__init__(real)
        self.delays = list(delays)

    def __call__(self, model, batch):
        out = super().__call__(model, batch)
        time.sleep(self.delays.pop(0) if self.delays else 0.0)
        return out


def test_throughput_is_from_the_median_call_as_in_the_bench(variant, tmp_path, monkeypatch):
    """One slow call among three (a clock ramp, a GC pause) moved the mean-based row by half: the
    notebook then disagreed with `colquant bench` for no reason in the model."""
    slow = SlowCalls(no_encoding, [0.0, 0.02, 0.02, 0.3])  # warm-up, then three timed calls
    monkeypatch.setattr(sweep, "encode_batch", slow)
    row = sweep_once(variant, tmp_path / "sweep.jsonl", batch_sizes=(2,), repeats=3).iloc[0]
    assert row["timed_calls"] == 3 and row["latency_mean_ms"] > 100 > row["latency_p50_ms"] >= 20
    assert row["items_per_s"] == pytest.approx(2 / (row["latency_p50_ms"] / 1e3))


def test_short_calls_are_repeated_until_the_minimum_time(variant, tmp_path, monkeypatch):
    slow = SlowCalls(no_encoding, [0.0] + [0.01] * 500)
    monkeypatch.setattr(sweep, "encode_batch", slow)
    row = sweep_once(variant, tmp_path / "sweep.jsonl", batch_sizes=(1,), repeats=2, min_time_s=0.1).iloc[0]
    assert 2 < row["timed_calls"] == len(slow.seen) - 1 and row["min_time_s"] == 0.1
    assert row["timed_calls"] * row["latency_mean_ms"] >= 100


def test_a_negative_minimum_time_is_refused(variant, tmp_path):
    with pytest.raises(ValueError, match="min_time_s >= 0"):
        sweep_once(variant, tmp_path / "sweep.jsonl", min_time_s=-1)


def hand_made_results() -> pd.DataFrame:
    """bf16 needs ~8.3 GiB before any activations; w4a16 ~3.4 GiB and its throughput dips at 512."""
    measured = [
        ("bf16", 8, 191, 8527), ("bf16", 32, 712, 8718), ("bf16", 128, 947, 9357), ("bf16", 256, 966, 10220),
        ("w4a16", 8, 94, 3458), ("w4a16", 128, 909, 4247), ("w4a16", 256, 969, 5106), ("w4a16", 512, 951, 6963),
    ]
    rows = [
        {"variant": v, "kind": "query", "batch_size": b, "status": "ok", "items_per_s": t, "peak_memory_mib": m,
         "memory_kind": "cuda_allocated"}
        for v, b, t, m in measured
    ]
    rows.append({"variant": "w4a16", "kind": "query", "batch_size": 1024, "status": "oom", "items_per_s": None,
                 "peak_memory_mib": None, "memory_kind": None})
    return pd.DataFrame(rows, columns=sweep.COLUMNS)


def test_budget_table_picks_the_fastest_batch_that_fits():
    table = sweep.budget_table(hand_made_results(), [8, 9.5, 12]).set_index(["budget_gb", "variant"])
    assert table.loc[(8, "bf16"), "fit"] == "does not fit" and pd.isna(table.loc[(8, "bf16"), "batch_size"])
    assert table.loc[(8, "bf16"), "smallest_peak_mib"] == 8527
    assert table.loc[(8, "w4a16"), "batch_size"] == 256  # 969 items/s beats 951 at batch 512
    assert table.loc[(8, "w4a16"), "peak_memory_mib"] == 5106
    assert pd.isna(table.loc[(8, "w4a16"), "vs_baseline"])
    assert table.loc[(9.5, "bf16"), "batch_size"] == 128  # 9357 MiB fits 9.5 GiB = 9728 MiB
    assert table.loc[(12, "bf16"), "batch_size"] == 256
    assert table.loc[(12, "w4a16"), "vs_baseline"] == pytest.approx(969 / 966)


def test_same_batch_comparison_gives_ratios_to_the_baseline():
    table = sweep.same_batch_comparison(hand_made_results()).set_index("batch_size")
    assert table.loc[8, "w4a16_vs_bf16"] == pytest.approx(94 / 191)
    assert table.loc[256, "bf16_items_per_s"] == 966
    assert pd.isna(table.loc[512, "bf16_items_per_s"]) and table.loc[512, "w4a16_items_per_s"] == 951
    assert 32 in table.index and pd.isna(table.loc[32, "w4a16_vs_bf16"])
    with pytest.raises(ValueError, match="baseline"):
        sweep.same_batch_comparison(hand_made_results(), baseline="fp8")


def test_plots_return_figures():
    results = hand_made_results()
    figures = [sweep.plot_throughput(results), sweep.plot_memory(results, [8, 12, 16, 24, 40, 80])]
    assert all(isinstance(figure, Figure) for figure in figures)
    for figure in figures:
        plt.close(figure)


def test_sweep_variants_measures_each_variant_with_one_model_loaded(tiny_path, tmp_path):
    import weakref

    import colquant
    from colquant.evaluate.sweep import sweep_variants

    alive: list[weakref.ref] = []

    def load(checkpoint):
        assert all(ref() is None for ref in alive), "previous variant still in memory"
        model, processor = colquant.load(checkpoint, max_num_visual_tokens=64)
        alive.append(weakref.ref(model))
        return model, processor

    results = sweep_variants({"bf16": tiny_path, "again": tiny_path}, load, query_batch_sizes=[1], page_batch_sizes=[1],
                             query_tokens=8, repeats=1, results_path=tmp_path / "sweep.jsonl", device="cpu",
                             min_time_s=0)
    assert sorted(set(zip(results["variant"], results["kind"]))) == [("again", "page"), ("again", "query"), ("bf16", "page"), ("bf16", "query")]
    assert all(ref() is None for ref in alive)
    only_bf16 = sweep_variants({"bf16": tiny_path}, load, query_batch_sizes=[1], page_batch_sizes=[1],
                               query_tokens=8, repeats=1, results_path=tmp_path / "sweep.jsonl", device="cpu",
                               min_time_s=0)
    assert set(only_bf16["variant"]) == {"bf16"}  # a variant no longer compared is not reported


def sweep_vs_bench_script():
    """benchmarks/sweep_vs_bench.py, imported from its path (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "sweep_vs_bench.py"
    spec = importlib.util.spec_from_file_location("sweep_vs_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_vs_bench_times_both_methods_for_both_precisions(tiny_w4a16_path, tmp_path, monkeypatch):
    """The plumbing on CPU (tiny profile): no ratio is asserted, only that every row pairs the two methods."""
    monkeypatch.setenv("COLQUANT_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.setattr(sweep, "MIN_TIME_S", 0.0)
    out = tmp_path / "sweep-vs-bench.json"
    script = sweep_vs_bench_script()
    assert script.main(["--profile", "tiny", "--device", "cpu", "--query-batches", "1", "--out", str(out),
                        "--w4-checkpoint", str(tiny_w4a16_path)]) == 0
    report = json.loads(out.read_text())
    assert sorted((r["precision"], r["work"], r["batch"]) for r in report["rows"]) == [
        ("bf16", "page", 1), ("bf16", "query", 1), ("w4a16", "page", 1), ("w4a16", "query", 1)]
    for row in report["rows"]:
        assert row["ratio"] == pytest.approx(row["sweep_per_s"] / row["bench_per_s"])
        assert row["agrees"] == (abs(row["ratio"] - 1) <= 0.05) and row["bench_peak_mib"] > 0
    assert str(tiny_w4a16_path) in report["models"]["w4a16"]["sweep"]
    assert {r["sweep_tokens"] for r in report["rows"] if r["work"] == "query"} == {8 + 10}


def test_sweep_vs_bench_without_a_4bit_checkpoint_says_what_it_times(tmp_path, monkeypatch, caplog):
    from colquant.kernels import W4A16Linear
    from colquant.research import workspace
    from colquant.research.params import load_profile

    monkeypatch.setenv("COLQUANT_OUTPUT_ROOT", str(tmp_path / "outputs"))
    profile = load_profile("params/tiny.yaml")
    script = sweep_vs_bench_script()
    assert script.w4_checkpoint(profile, None) is None  # the workspace holds no variant yet
    with caplog.at_level("WARNING", logger="colquant.sweep_vs_bench"):
        model, _, weights, loaded = script.notebook_model(profile, "w4a16", None)
    assert "no 4-bit checkpoint" in caplog.text and "no 4-bit checkpoint" in loaded
    assert weights.startswith("rtn:") and any(isinstance(m, W4A16Linear) for m in model.modules())
    assert str(workspace.base_model(profile)) in loaded
