"""colquant.basics.arguments: the checks every public entry point runs on its options."""

import numpy as np
import pytest
import torch

from colquant.basics.arguments import require_count, require_flag, usable_device


def test_flags_are_booleans_and_none_only_where_it_means_something():
    require_flag("padded", False)
    require_flag("bf16_copy", None, none_means="the default")
    for value in ("no", "False", 0, 1, np.bool_(True)):
        with pytest.raises(TypeError, match=rf"padded={value!r} is not a boolean: pass True or False$"):
            require_flag("padded", value)
    with pytest.raises(TypeError, match="padded=None is not a boolean"):
        require_flag("padded", None)


def test_counts_are_integers_of_python_or_numpy_not_bools_floats_or_strings():
    require_count("batch_size", 8, 1)
    require_count("batch_size", np.int64(8), 1)
    require_count("num_workers", 0, 0)
    for value in (True, 8.0, "8", None):
        with pytest.raises(TypeError, match=r"batch_size must be an int >= 1, got .* \(\w+\)"):
            require_count("batch_size", value, 1)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        require_count("num_workers", -1, 0)


def test_a_device_this_machine_has_is_returned_as_a_torch_device(monkeypatch):
    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='gpu' is not a device: pass 'auto' .* 'cuda' or 'cuda:N'"):
        usable_device("gpu")  # torch's RuntimeError listed two dozen device types
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda:0': this machine has no CUDA device"):
        usable_device(torch.device("cuda", 0))
