"""e4m3 rounding written out, independent of torch's float8 cast: the tests' yardstick for the W4A8 re-encodings."""

import torch

# the finite non-negative e4m3 values in code order (0x00 .. 0x7E), which is also ascending value order
_CODES = torch.arange(0x7F, dtype=torch.uint8)
_VALUES = _CODES.view(torch.float8_e4m3fn).double()


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float64 values of ``x`` (|x| <= 448) rounded to the nearest e4m3 value, ties to the even code."""
    a = x.double().abs().flatten()
    if bool((a > _VALUES[-1]).any()):
        raise ValueError("beyond e4m3's range (448)")
    hi = torch.searchsorted(_VALUES, a).clamp(max=len(_VALUES) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - _VALUES[lo], _VALUES[hi] - a
    tie_to_hi = (d_hi == d_lo) & (_CODES[hi] % 2 == 0)
    pick = torch.where((d_hi < d_lo) | tie_to_hi, hi, lo)
    return (torch.sign(x.double()).flatten() * _VALUES[pick]).reshape(x.shape)
