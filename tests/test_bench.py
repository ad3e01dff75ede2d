"""The benchmark's plumbing on CPU (tiny profile, reference path): rows, checks, tables, JSON."""

from __future__ import annotations

import json

import pytest

from colquant.deploy import bench, bench_report
from colquant.research.params import load_profile


@pytest.fixture
def tiny_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("COLQUANT_OUTPUT_ROOT", str(tmp_path / "outputs"))
    return load_profile("params/tiny.yaml")


def test_tiny_bench_runs_on_cpu_and_writes_json(tiny_profile, tmp_path, monkeypatch, caplog):
    built, load = [], bench.load_model
    monkeypatch.setattr(bench, "load_model", lambda profile, device: built.append(device) or load(profile, device))
    out = tmp_path / "bench.json"
    with caplog.at_level("INFO", logger="colquant.deploy.bench"):
        table = bench.run_bench(tiny_profile, out, device="cpu")
    assert list(table.columns)[-2:] == ["thr_ratio", "mem_ratio"]  # ratios last
    assert set(table.work) == {"query", "page"}
    assert len(built) == 1 + len(tiny_profile["bench"]["precisions"])  # reference + one fresh model each
    data = json.loads(out.read_text())
    assert data["env"]["backend"] == "reference" and data["env"]["memory_kind"] == "process_rss"
    checks = data["model_checks"]
    assert checks["bf16-eager_vs_transformers_queries"]["cos_min"] > 0.9999
    assert checks["bf16_vs_transformers_queries"]["cos_min"] > 0.999
    assert checks["bf16_vs_transformers_page"]["cos_min"] > 0.999
    assert checks["w4a16_vs_dequant_reference_queries"]["cos_min"] > 0.999
    assert all(c["padding_exact_zero"] for c in checks.values())
    works = {(r["precision"], r["work"]) for r in data["results"]}
    assert {("bf16-eager", "query"), ("bf16", "page"), ("w4a16", "page-e2e"), ("w4a16", "preprocess")} <= works
    e2e = [r for r in data["results"] if r["work"] == "page-e2e"]
    assert all(r["bound"] in ("GPU", "CPU preprocessing") and r["over_tensors"] > 0 for r in e2e)
    assert all(r["pages_per_call"] == 2 * r["batch"] and r["first_call_ms"] > 0 for r in e2e)  # 2 batches a call
    assert "thr / bf16" in caplog.text and "PIL e2e p/s" in caplog.text and "targets:" in caplog.text


def test_query_texts_come_from_the_tokenizer_at_the_asked_length(tiny_model):
    _, processor = tiny_model
    texts = bench.query_texts(processor.tokenizer, 3, 12)
    assert len(set(texts)) == 3
    assert [len(processor.tokenizer(t)["input_ids"]) for t in texts] == [12, 12, 12]
    ragged = bench.query_texts(processor.tokenizer, 4, 12, ragged=True)
    assert len({len(processor.tokenizer(t)["input_ids"]) for t in ragged}) > 1


def test_unknown_precision_and_target_are_refused(tiny_profile):
    with pytest.raises(ValueError, match="unknown precision 'fp4'; known: bf16-eager, bf16, w4a16"):
        bench.Bench(tiny_profile, __import__("torch").device("cpu")).precision("fp4", {})
    with pytest.raises(ValueError, match=r"bench.targets: unknown \['pages'\]"):
        bench_report.targets_met([], {"pages": 1.0})


def test_targets_read_the_rows():
    rows = [dict(precision="bf16", work="page", batch=16, items_per_s=40.0),
            dict(precision="bf16", work="page-e2e", batch=16, items_per_s=36.0, over_tensors=0.9),
            dict(precision="bf16", work="query", batch=1, error="out of memory")]
    met = bench_report.targets_met(rows, {"bf16_pages_per_s": 42.0, "end_to_end_over_tensors_ratio_min": 0.85,
                                          "bf16_queries_per_s": 10.0})
    assert met["bf16_pages_per_s"] == dict(target=42.0, value=40.0, met=False)
    assert met["end_to_end_over_tensors_ratio_min"]["met"] is True
    assert met["bf16_queries_per_s"] == dict(target=10.0, value=None, met=False)  # only an error row


def test_fp8_targets_read_the_default_fp8_variants_not_the_precise_ones():
    rows = [dict(precision="fp8-all", work="page", batch=16, items_per_s=48.0),
            dict(precision="fp8-lm", work="page", batch=16, items_per_s=45.0),
            dict(precision="fp8-all-precise", work="page", batch=16, items_per_s=80.0),
            dict(precision="fp8-lm-precise", work="query", batch=1024, items_per_s=3300.0),
            dict(precision="fp8-lm", work="query", batch=1024, items_per_s=3100.0)]
    met = bench_report.targets_met(rows, {"fp8_pages_per_s": 75.0, "fp8_queries_per_s": 3200.0})
    assert met["fp8_pages_per_s"] == dict(target=75.0, value=48.0, met=False)
    assert met["fp8_queries_per_s"] == dict(target=3200.0, value=3100.0, met=False)


def test_cli_overrides_the_profile(monkeypatch, tmp_path):
    from colquant import __main__ as cli

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda profile, out, device=None: seen.update(p=profile, o=out))
    assert cli.main(["bench", "--profile", "tiny", "--out", str(tmp_path / "x.json"), "--query-batches", "1,8",
                     "--page-batches", "", "--no-kernel-checks"]) == 0
    assert seen["p"]["profile"] == "tiny" and seen["o"] == str(tmp_path / "x.json")
    assert seen["p"]["bench"]["query_batches"] == [1, 8] and seen["p"]["bench"]["page_batches"] == []
    assert seen["p"]["bench"]["kernel_checks"] is False


def test_summary_pairs_every_precision_with_bf16_of_the_same_run_and_survives_missing_rows():
    page = dict(vision="fast", work="page", batch=16, reps=3)
    rows = [dict(page, precision="bf16", ms=400.0, items_per_s=40.0, peak_mib=100.0),
            dict(page, precision="bf16", vision="eager", ms=600.0, items_per_s=26.7, peak_mib=900.0),
            dict(page, precision="w4a16", ms=500.0, items_per_s=32.0, peak_mib=50.0),
            dict(page, precision="w4a8", ms=320.0, items_per_s=50.0, peak_mib=40.0)]
    table = bench_report.summary(rows)
    assert table.to_dict(orient="records") == [
        dict(precision="w4a16", work="page", batch=16, bf16_ms=400.0, bf16_per_s=40.0, bf16_peak_mib=100.0, ms=500.0,
             per_s=32.0, peak_mib=50.0, thr_ratio=0.8, mem_ratio=0.5),
        dict(precision="w4a8", work="page", batch=16, bf16_ms=400.0, bf16_per_s=40.0, bf16_peak_mib=100.0, ms=320.0,
             per_s=50.0, peak_mib=40.0, thr_ratio=1.25, mem_ratio=0.4)]
    assert bench_report.summary(rows[:2]).empty and bench_report.summary([]).empty  # BF16 alone: no pairs
    assert bench_report.summary(rows[2:]).empty  # no BF16 in this run: nothing to compare with
    report = bench_report.format_report(table, rows, {})
    assert "bf16       fast      16" in report and any(line.startswith("w4a8          page      16") for line in report.splitlines())


def test_ratio_targets_check_a_precision_against_bf16_at_one_batch():
    """The issue's targets as the profile states them: throughput ratios at least, memory ratios at most."""
    rows = [dict(precision=precision, work=work, batch=batch, ms=1.0, items_per_s=speed, peak_mib=memory)
            for precision, work, batch, speed, memory in [("bf16", "query", 1024, 1000.0, 100.0),
                                                          ("w4a8", "query", 1024, 1660.0, 39.0),
                                                          ("bf16", "page", 16, 40.0, 100.0),
                                                          ("w4a8", "page", 16, 49.6, 45.0)]]
    met = bench_report.targets_met(rows, {"w4a8 thr_ratio query 1024": 1.6, "w4a8 mem_ratio query 1024": 0.40,
                                          "w4a8 thr_ratio page 16": 1.25, "w4a8 mem_ratio page 16": 0.40,
                                          "w4a16-memory thr_ratio query 1": 1.3})
    assert met["w4a8 thr_ratio query 1024"] == dict(target=1.6, value=1.66, met=True)
    assert met["w4a8 mem_ratio query 1024"]["met"] and not met["w4a8 mem_ratio page 16"]["met"]
    assert met["w4a8 thr_ratio page 16"] == dict(target=1.25, value=1.24, met=False)
    assert met["w4a16-memory thr_ratio query 1"] == dict(target=1.3, value=None, met=False)  # not timed in this run
    with pytest.raises(ValueError, match="'<precision> <thr|mem>_ratio <query|page> <batch>'"):
        bench_report.targets_met(rows, {"w4a8 speed query 1024": 1.6})


def test_a_gemm_shape_with_no_passing_route_fails_the_checks():
    from colquant.kernels import checks

    assert checks._gemm_row("qkv", 2560, 6144, 16, None) == dict(shape="qkv", K=2560, N=6144, M=16, ok=False)
    row = checks._gemm_row("o", 4096, 2560, 16, dict(name="bf16", fallback_name="triton-a", us=20.0, bf16_us=10.0))
    assert row["ok"] and row["w4_choice"] == "triton-a" and row["dispatch"] == "bf16" and row["speedup"] == 0.5


def test_fp8_w4a8_and_memory_first_precisions_are_timed_and_checked(tiny_profile, tmp_path):
    tiny_profile["bench"].update(precisions=["bf16", "w4a16-memory", "w4a8", "fp8-lm", "fp8-all"], query_batches=[1],
                                 page_batches=[1], end_to_end_batches=0)
    bench.run_bench(tiny_profile, tmp_path / "bench.json", device="cpu")
    data = json.loads((tmp_path / "bench.json").read_text())
    checks = data["model_checks"]
    assert checks["fp8-all_vs_transformers_queries"]["cos_min"] > 0.95  # W8A8 on a random tiny model
    assert checks["w4a8_vs_transformers_queries"]["cos_min"] > 0.95  # W4A8 likewise
    for precision in ("w4a16-memory", "w4a8"):
        assert checks[f"{precision}_vs_dequant_reference_queries"]["cos_min"] > 0.999
    timed = {(r["precision"], r["work"]) for r in data["results"] if "ms" in r}
    assert {("fp8-lm", "query"), ("fp8-all", "page"), ("w4a16-memory", "query"), ("w4a8", "query"),
            ("w4a8", "page")} <= timed


def test_w4a8_is_refused_where_its_kernel_cannot_run(tiny_profile, tiny_model, monkeypatch):
    from colquant.kernels import w4a8

    model, _ = tiny_model  # shared: both refusals come before anything changes it
    with monkeypatch.context() as patch:
        patch.setattr(w4a8, "device_problem", lambda device, dtype: "no CUTLASS W4A8 here (test)")
        with pytest.raises(RuntimeError, match="w4a8 cannot run: no CUTLASS W4A8 here"):
            bench.PREPARE["w4a8"](model, tiny_profile)
    tiny_profile["quantization"]["group_size"] = 64
    with pytest.raises(RuntimeError, match="group_size is 64; CUTLASS W4A8 takes group size 128"):
        bench.PREPARE["w4a8"](model, tiny_profile)


def test_pages_from_pil_are_timed_through_a_warm_pipeline_with_workers(tiny_profile, tmp_path, monkeypatch):
    """With workers, every end-to-end call after the first runs on the same worker processes."""
    import multiprocessing

    from colquant.retriever import encode

    tiny_profile["bench"].update(precisions=["bf16"], query_batches=[1], page_batches=[2], end_to_end_batches=2,
                                 workers=2)
    seen: list[frozenset] = []
    real = encode.encode_pages
    monkeypatch.setattr(encode, "encode_pages", lambda *args, **options: (
        real(*args, **options), seen.append(frozenset(multiprocessing.active_children())))[0])
    bench.run_bench(tiny_profile, tmp_path / "bench.json", device="cpu")
    assert len(seen) >= 3 and len(set(seen)) == 1 and len(seen[0]) >= 2  # first, warm-up and timed calls
    e2e = [r for r in json.loads((tmp_path / "bench.json").read_text())["results"] if r["work"] == "page-e2e"]
    assert [(r["workers"], r["pages_per_call"]) for r in e2e] == [(2, 4)]


def test_the_pages_table_prints_the_pipelines_first_call_beside_its_steady_state():
    """The first call of a page pipeline starts its workers: an indexer pays it once, so it is shown apart."""
    labels = dict(precision="bf16", vision="fast", batch=16)
    rows = [dict(labels, work="page", ms=400.0, items_per_s=40.0, peak_mib=1.0),
            dict(labels, work="page-e2e", ms=4800.0, items_per_s=36.0, peak_mib=1.0, over_tensors=0.9,
                 bound="GPU", first_call_ms=7250.0),
            dict(labels, work="preprocess", ms=1000.0, items_per_s=192.0, peak_mib=0.0)]
    report = bench_report.format_report(bench_report.summary(rows), rows, {})
    header, line = [x for x in report.splitlines() if "1st call s" in x or x.startswith("bf16       fast")]
    assert line.split() == ["bf16", "fast", "16", "|", "40.0", "36.0", "0.90", "192.0", "7.25", "GPU"]
    assert header.split()[-3:] == ["call", "s", "bound"]


@pytest.mark.parametrize("name", ["tiny", "synthetic-4b", "colqwen3-4b"])
def test_every_profiles_bench_targets_are_names_the_report_knows(name):
    bench_report.check_targets(load_profile(f"params/{name}.yaml", check_device=False)["bench"]["targets"])


def test_an_unknown_target_is_refused_before_anything_is_timed(tiny_profile, monkeypatch):
    monkeypatch.setattr(bench, "load_model", lambda *args: pytest.fail("a model was loaded"))
    tiny_profile["bench"]["targets"] = {"w4a8 speed query 1024": 1.6}
    with pytest.raises(ValueError, match="bench.targets: unknown"):
        bench.run_bench(tiny_profile, None, device="cpu")
