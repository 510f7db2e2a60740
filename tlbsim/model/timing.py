"""Time arithmetic shared by the model's processes."""


def clock_tolerance(now_us: float) -> float:
    """What is left of a time budget below this is rounding, not time: an
    absolute nanosecond-scale floor plus a few ulps of the clock (at 2^24 us
    and beyond, a float clock cannot advance by 1e-9 us any more)."""
    return 1e-9 + now_us * 1e-15
