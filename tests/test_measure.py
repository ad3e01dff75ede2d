import torch

from colquant.measure import measure


def test_cpu_peak_covers_an_allocation_made_inside_the_block():
    with measure("cpu") as result:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        block += 1
    assert result.memory_kind == "process_rss"
    assert result.peak_memory_bytes - result.in_use_before_bytes >= 60 * 2**20
    assert result.wall_time_s > 0
