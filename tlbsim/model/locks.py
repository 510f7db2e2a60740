"""What can lock a VP's TLB, until when, and by what (no SimPy events per lock).

Owns one question for the hypervisor: "is this target's TLB locked now, until
when, by which source?" (``TlbLocks.lock_on``). Sources register per
partition; a VP that no source can lock costs the flush path nothing.

- ``VsmTlbLocks`` (VSM TlbLocked, bit 1 of HV_REGISTER_VSM_VP_SECURE_VTL_CONFIG):
  a higher VTL holds the lock for episodes that form an alternating renewal
  process per VP: unlocked gaps ~ Exp(1 / rate), holds ~ the hold
  distribution. Queries advance through the episodes lazily (query times
  never decrease within a run), drawing from the VP's ``vsm`` stream, so the
  episode sequence does not depend on when or how often it is asked.
- ``InterceptInhibit`` (TlbFlushInhibit in HvRegisterInterceptSuspend): set
  while the virtualization stack emulates a MemoryAccess exit; the VP reports
  the start and end of that emulation.
"""

from __future__ import annotations

import math

from tlbsim.model.rng import Stream


class VsmEpisodes:
    """One VP's VSM TlbLocked episodes."""

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


class VsmTlbLocks:
    """VSM TlbLocked on the VPs that have a VTL1."""

    name = "VSM TlbLocked"
    __slots__ = ("by_vp",)

    def __init__(self, by_vp: dict[int, VsmEpisodes]):
        self.by_vp = by_vp

    def active(self) -> bool:
        return bool(self.by_vp)

    def locked_until(self, vp_index: int, now: float) -> float | None:
        episodes = self.by_vp.get(vp_index)
        return None if episodes is None else episodes.locked_until(now)


class InterceptInhibit:
    """TlbFlushInhibit while a MemoryAccess exit is being emulated."""

    name = "TlbFlushInhibit"
    __slots__ = ("emulating",)

    def __init__(self):
        self.emulating: dict[int, float] = {}  # VP index -> when its emulation ends

    def begin(self, vp_index: int, end_us: float) -> None:
        self.emulating[vp_index] = end_us

    def end(self, vp_index: int) -> None:
        del self.emulating[vp_index]

    def active(self) -> bool:
        return bool(self.emulating)

    def locked_until(self, vp_index: int, now: float) -> float | None:
        return self.emulating.get(vp_index)


class TlbLocks:
    """The lock sources of one partition, queried by the hypervisor."""

    __slots__ = ("sources",)

    def __init__(self, sources=()):
        self.sources = list(sources)

    def register(self, source) -> None:
        self.sources.append(source)

    def any_active(self) -> bool:
        """Cheap gate: can any TLB of the partition be locked right now?
        (Asked on every flush hypercall: a loop, not ``any()`` over a generator.)"""
        for source in self.sources:  # noqa: SIM110
            if source.active():
                return True
        return False

    def lock_on(self, vp_index: int, now: float) -> tuple[float, str] | None:
        """(when the last lock on this VP's TLB lifts, the source holding it
        longest), or None if no source locks it at ``now``."""
        found = None
        for source in self.sources:
            end = source.locked_until(vp_index, now)
            if end is not None and (found is None or end > found[0]):
                found = (end, source.name)
        return found
