import torch

from colquant.basics.measure import call_times, measure


def test_cpu_peak_covers_an_allocation_made_inside_the_block():
    with measure("cpu") as result:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        block += 1
    assert result.memory_kind == "process_rss"
    assert result.peak_memory_bytes - result.in_use_before_bytes >= 60 * 2**20
    assert result.wall_time_s > 0


def test_call_times_runs_at_least_the_calls_then_until_the_minimum_time_within_the_cap():
    counted = []
    times = call_times(lambda: counted.append(1), torch.device("cpu"), calls=3)
    assert len(times) == len(counted) == 3 and all(t >= 0 for t in times)
    capped = call_times(lambda: None, torch.device("cpu"), calls=1, min_time_s=60.0, max_calls=7)
    assert len(capped) == 7  # a minute of calls asked for, the cap ends it
