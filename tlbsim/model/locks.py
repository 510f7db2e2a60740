"""What locks a VP's TLB, computed lazily (no SimPy events per lock).

VSM TlbLocked: a higher VTL holds the lock for episodes that form an
alternating renewal process: unlocked gaps ~ Exp(1 / rate), holds ~ the hold
distribution. ``locked_until(t)`` advances through the episodes up to t (t
never decreases within a run) and returns when the hold covering t ends.

TlbFlushInhibit (HvRegisterInterceptSuspend): set while the virtualization
stack emulates a MemoryAccess exit; that is VP state, see vp.VP.lock_end_us.
"""

from __future__ import annotations

import math

from tlbsim.model.rng import Stream


class VsmTlbLock:
    __slots__ = ("_stream", "_gap_mean", "_hold_mean", "_fixed", "start_us", "end_us", "episodes")

    def __init__(self, stream: Stream, rate_per_ms: float, hold_mean_us: float, fixed: bool):
        self._stream = stream
        self._gap_mean = 1000.0 / rate_per_ms if rate_per_ms > 0 else math.inf
        self._hold_mean = hold_mean_us
        self._fixed = fixed
        self.episodes = 0
        self.start_us = self._stream.exp(self._gap_mean)
        self.end_us = self.start_us + self._hold()

    def _hold(self) -> float:
        return self._hold_mean if self._fixed else self._stream.exp(self._hold_mean)

    def locked_until(self, now: float) -> float | None:
        """The end of the hold covering ``now``, or None if unlocked."""
        while self.end_us <= now:
            self.episodes += 1
            self.start_us = self.end_us + self._stream.exp(self._gap_mean)
            self.end_us = self.start_us + self._hold()
        return self.end_us if self.start_us <= now else None
