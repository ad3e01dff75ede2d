"""The benchmark's plumbing on CPU (tiny profile, reference path): table, ratios, JSON."""

from __future__ import annotations

import json

from colquant import bench


def test_tiny_bench_runs_on_cpu_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    table = bench.run_bench("tiny", out, device="cpu", overrides=dict(query_batches=[1, 2], page_batches=[1]))
    assert list(table.columns)[-2:] == ["thr_ratio", "mem_ratio"]  # ratios last
    assert set(table.work) == {"query", "page"}
    data = json.loads(out.read_text())
    assert data["env"]["backend"] == "reference" and "cpu" in data["env"]["reason"]
    checks = data["model_checks"]
    assert checks["bf16_fast_vs_hf_queries"]["cos_min"] > 0.999
    assert checks["bf16_fast_vs_hf_page"]["cos_min"] > 0.999
    assert checks["w4_fast_vs_dequant_reference_queries"]["cos_min"] > 0.999
    assert all(c["padding_exact_zero"] for c in checks.values())
    assert {r["precision"] for r in data["results"]} == {"bf16-hf-eager", "bf16", "w4a16"}
    printed = capsys.readouterr().out
    assert "w4/bf16 thr" in printed and "targets:" in printed


def test_cli_parses_batches(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda p, o, **kw: seen.update(p=p, o=o, **kw))
    assert bench.main(["--profile", "tiny", "--out", str(tmp_path / "x.json"), "--query-batches", "1,8",
                       "--page-batches", "", "--no-calibrate"]) == 0
    assert seen["p"] == "tiny"
    assert seen["overrides"] == {"query_batches": [1, 8], "page_batches": [], "calibrate": False}


def test_single_copy_cost_summarises_rows_where_humming_lost():
    from colquant.bench import single_copy_cost

    rows = [dict(shape="qkv", M=44, w4_us=10.0, w4_choice="humming", humming_us=10.0),
            dict(shape="qkv", M=11264, w4_us=100.0, w4_choice="dequant+cublas", humming_us=110.0),
            dict(shape="o", M=43008, w4_us=200.0, w4_choice="dequant+cublas", humming_us=205.0),
            dict(shape="o", M=1, w4_us=5.0, w4_choice="triton", humming_us=None)]
    c = single_copy_cost(rows)
    assert c["rows"] == 2 and c["worst_slowdown"] == 1.1 and c["worst_at"] == "qkv M=11264"
    assert abs(c["mean_slowdown"] - 1.0625) < 1e-9
    assert single_copy_cost([]) == dict(rows=0)
