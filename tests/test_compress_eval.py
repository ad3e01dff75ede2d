"""mteb evaluation of compressed page indexes, and the grid's table, Pareto front and recommendation."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from colquant.inference.compress import compress_pages, parse_setting, score_compressed
from colquant.inference.compress import compression_report, compression_table, pareto_front, recommend
from colquant.evaluate.compress_eval import (
    CompressedIndexEncoder,
    EmbeddingMemo,
    evaluate_setting,
    plot_pareto,
)
from colquant.evaluate.evaluation import ColQuantEncoder, get_tasks
from tiny_task import N_PAGES, N_QUERIES, TASK



REVISION = "0123456789abcdef"  # the evaluation fingerprint (hex) results are filed under


def test_settings_share_encodings_and_get_results_of_their_own(small_model, corpus_root, tmp_path, monkeypatch):
    tasks = get_tasks([TASK], corpus_root=corpus_root, n_pages=N_PAGES, n_queries=N_QUERIES)
    calls = []
    original = ColQuantEncoder.encode

    def counting_encode(self, *args, **kwargs):
        calls.append(kwargs["prompt_type"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ColQuantEncoder, "encode", counting_encode)
    memo = EmbeddingMemo()
    frames = [evaluate_setting(*small_model, "bf16", parse_setting(name), tasks, tmp_path, revision=REVISION, batch_size=4,
                               corpus_chunk_size=N_PAGES, memo=memo) for name in ("none", "pool2+binary")]
    assert len(calls) == 2  # queries and pages once, for both settings
    none, binary = (frame.iloc[0] for frame in frames)
    assert (none["variant"], none["setting"], binary["setting"]) == ("bf16", "none", "pool2+binary")
    assert binary["bytes_per_page"] < none["bytes_per_page"] / 16
    for name in ("none", "pool2-binary"):
        stored = tmp_path / "results" / f"colquant__bf16__index-{name}" / REVISION / f"{TASK}.json"
        assert json.loads(stored.read_text())["task_name"] == TASK

    calls.clear()
    again = evaluate_setting(*small_model, "bf16", parse_setting("pool2+binary"), tasks, tmp_path, revision=REVISION, batch_size=4,
                             corpus_chunk_size=N_PAGES)
    assert calls == [] and again["bytes_per_page"].tolist() == frames[1]["bytes_per_page"].tolist()

    (tmp_path / "index_stats" / "bf16__index-none" / f"{REVISION}.json").unlink()
    with pytest.raises(ValueError, match="no index size recorded"):
        evaluate_setting(*small_model, "bf16", parse_setting("none"), tasks, tmp_path, revision=REVISION, batch_size=4,
                         corpus_chunk_size=N_PAGES)


def test_encoder_similarity_scores_the_compressed_index():
    encoder = CompressedIndexEncoder.__new__(CompressedIndexEncoder)
    encoder.setting, encoder.device, encoder.index_stats, encoder._current = parse_setting("int8"), "cpu", {}, "t/s"
    generator = torch.Generator().manual_seed(0)
    queries, pages = torch.randn(3, 4, 16, generator=generator), torch.randn(5, 7, 16, generator=generator)
    expected = score_compressed(queries, compress_pages(pages, "int8"))
    assert torch.equal(encoder.similarity(queries, pages), expected)
    assert encoder.index_stats["t/s"] == {"pages": 5, "bytes": compress_pages(pages, "int8").nbytes}


def grid() -> pd.DataFrame:
    rows = [("bf16", "none", 0.80, 1000), ("bf16", "binary", 0.79, 40), ("bf16", "int8", 0.80, 300),
            ("w4", "none", 0.78, 1000), ("w4", "binary", 0.70, 40), ("w4", "pool3+binary", 0.60, 15)]
    return pd.DataFrame([{"task": t, "variant": v, "setting": s, "ndcg_at_5": n, "bytes_per_page": b}
                         for t in ("a", "b") for v, s, n, b in rows])


def test_table_front_and_recommendation_on_hand_made_scores():
    table = compression_table(grid())
    row = table.set_index(["variant", "setting"]).loc[("w4", "binary")]
    assert row["size_vs_none"] == pytest.approx(0.04)
    assert row["ndcg_vs_none_%"] == pytest.approx((0.70 / 0.78 - 1) * 100)
    assert row["tasks"] == 2
    front = pareto_front(table)
    assert list(zip(front["variant"], front["setting"])) == [("w4", "pool3+binary"), ("bf16", "binary"), ("bf16", "int8")]
    assert recommend(table).startswith("Use bf16 with the binary index")
    assert isinstance(plot_pareto(table), Figure)
    with pytest.raises(ValueError, match="no 'none' setting"):
        compression_table(grid().query("setting != 'none'"))


def test_report_section_reads_the_notebooks_table(tmp_path):
    assert "No compression grid yet" in compression_report(tmp_path)
    compression_table(grid()).to_csv(tmp_path / "compression_table.csv", index=False)
    section = compression_report(tmp_path)
    assert sum(line.startswith("| w4 ") or line.startswith("| bf16 ") for line in section.splitlines()) == 6
    assert section.rstrip().endswith("and the smallest index that is.")
    assert "Use bf16 with the binary index" in section
