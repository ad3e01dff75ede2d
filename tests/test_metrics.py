import json
import math

import pytest

from colquant.evaluate import metrics
from colquant.research import workspace


def test_a_metric_round_trips_by_its_definition_and_nan_reads_back_as_missing(tmp_path):
    metrics.record(tmp_path, metrics.NDCG_AT_5, {"bf16": 0.8, "w4a16-rtn": math.nan})
    metrics.record(tmp_path, metrics.PEAK_MEMORY_MIB, {("bf16", "page"): 1024, ("w4a16-rtn", "page"): 512.5})
    assert metrics.values(tmp_path, metrics.NDCG_AT_5) == {"bf16": 0.8}
    assert metrics.values(tmp_path, metrics.PEAK_MEMORY_MIB) == {("bf16", "page"): 1024.0, ("w4a16-rtn", "page"): 512.5}
    stored = json.loads((tmp_path / metrics.METRICS_FILE).read_text())  # JSON, no NaN literal
    assert stored["ndcg_at_5"][1] == {"variant": "w4a16-rtn", "value": None}


def test_recording_a_metric_again_replaces_it_so_a_dropped_variant_leaves(tmp_path):
    metrics.record(tmp_path, metrics.NDCG_AT_5, {"bf16": 0.8, "old-seqlen": 0.7})
    metrics.record(tmp_path, metrics.TASKS_EVALUATED, {"bf16": 3})
    metrics.record(tmp_path, metrics.NDCG_AT_5, {"bf16": 0.81})
    assert metrics.values(tmp_path, metrics.NDCG_AT_5) == {"bf16": 0.81}
    assert metrics.values(tmp_path, metrics.TASKS_EVALUATED) == {"bf16": 3.0}


@pytest.mark.parametrize(("metric", "values", "message"), [
    (metrics.Metric("ndcg", "spelled elsewhere", "05"), {"bf16": 1.0}, "not a registered metric"),
    (metrics.NDCG_AT_5, 0.8, "pass a mapping of variant to values"),
    (metrics.PEAK_MEMORY_MIB, {"bf16": 1.0}, r"indexed by \('variant', 'kind'\)"),
    (metrics.NDCG_AT_5, {"bf16": "high"}, "'high' is not a number"),
])
def test_bad_records_are_refused_with_what_to_pass(tmp_path, metric, values, message):
    with pytest.raises(ValueError, match=message):
        metrics.record(tmp_path, metric, values)
    assert not (tmp_path / metrics.METRICS_FILE).exists()


def test_a_corrupt_metrics_file_is_named_with_the_fix(tmp_path):
    (tmp_path / metrics.METRICS_FILE).write_text("{")
    with pytest.raises(workspace.OutputError, match=r"metrics.json.*re-run the notebooks"):
        metrics.values(tmp_path, metrics.NDCG_AT_5)


def test_nothing_recorded_yet_reads_as_no_values(tmp_path):
    assert metrics.values(tmp_path, metrics.NDCG_AT_5) == {}
