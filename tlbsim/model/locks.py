"""What can lock a VP's TLB, until when, and by what (no SimPy events per lock).

Owns one question for the hypervisor: "which of a call's targets have their
TLB locked now, until when, by which source?" (``TlbLocks.holders``). Sources
register per partition and each says which VPs it locks now (``locked``); a
VP that no source locks costs the flush path nothing.

- ``VsmTlbLocks`` (VSM TlbLocked, bit 1 of HV_REGISTER_VSM_VP_SECURE_VTL_CONFIG):
  held while the VP runs VTL1. A VTL1 entry is a state of the VP (vp.VP._vtl1:
  it runs no VTL0 code and takes no VTL0 interrupts meanwhile); entries come
  at ``vsm_rate_per_ms`` per ms of the VP's guest time and last a hold drawn
  from ``VsmSchedule``. The lock is released when the VP returns to VTL0
  (openvmm tlb_lock.rs: "unlock on VTL exit").
- ``InterceptInhibit`` (TlbFlushInhibit in HvRegisterInterceptSuspend): set
  while the virtualization stack emulates a MemoryAccess exit; the VP reports
  the start and end of that emulation.
"""

from __future__ import annotations

import math

from tlbsim.model.rng import Stream


class VsmSchedule:
    """When one VP enters VTL1 (gaps in guest time) and for how long."""

    __slots__ = ("_stream", "_gap_mean", "_hold_mean", "_fixed")

    def __init__(self, stream: Stream, rate_per_ms: float, hold_mean_us: float, fixed: bool):
        self._stream = stream
        self._gap_mean = 1000.0 / rate_per_ms if rate_per_ms > 0 else math.inf
        self._hold_mean = hold_mean_us
        self._fixed = fixed

    def next_gap_us(self) -> float:
        """Guest time until the next VTL1 entry."""
        return self._stream.exp(self._gap_mean)

    def hold_us(self) -> float:
        return self._hold_mean if self._fixed else self._stream.exp(self._hold_mean)


class VsmTlbLocks:
    """VSM TlbLocked: held by a VP while it runs VTL1."""

    name = "VSM TlbLocked"
    __slots__ = ("by_vp",)

    def __init__(self, by_vp: dict):
        self.by_vp = by_vp  # VP index -> VP, for the VPs that have a VTL1

    def active(self) -> bool:
        return bool(self.by_vp)

    def locked(self):
        """(VP index, lock end) of every VP holding the lock now."""
        return [(index, vp.vtl1_end_us) for index, vp in self.by_vp.items() if vp.in_vtl1]


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

    def locked(self):
        """(VP index, lock end) of every VP holding the lock now."""
        return self.emulating.items()


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

    def all_holders(self, vps, now: float) -> list[tuple[float, str, object]]:
        """(lock end, source, VP) of every VP of the partition holding a TLB lock now, in VP order
        (OpenHCL's snapshot: set_wait_for_tlb_locks takes every holder, target or not)."""
        found: dict[int, tuple[float, str]] = {}
        for source in self.sources:
            for index, end in source.locked():
                prev = found.get(index)
                if prev is None or end > prev[0]:
                    found[index] = (end, source.name)
        return [(*found[index], vps[index]) for index in sorted(found)]

    def holders(self, vps, member: int, scope, now: float) -> list[tuple[float, str, object]]:
        """(lock end, source, VP) for every target whose TLB is locked now
        and requires the flush (``scope``): the lock holders a call waits for,
        in ascending VP index (a plan's target order). ``vps`` is the
        partition's VPs by index, ``member`` the targets as a bitmask
        (CallPlan.member).

        Asks each source for the few VPs it locks now rather than each target
        whether it is locked: a call to 4,095 targets with one MemoryAccess
        emulation in flight looks at one VP, not 4,095 (the per-target query
        lock took 42 % of a 1,024-VP run's profile). Where sources overlap, the
        lock that lifts last counts (the first source on a tie); tests/test_model.py
        checks the answer against asking every target."""
        found: dict[int, tuple[float, str]] = {}
        for source in self.sources:
            name = source.name
            for index, end in source.locked():
                if member >> index & 1:
                    prev = found.get(index)
                    if prev is None or end > prev[0]:
                        found[index] = (end, name)
        if not found:
            return []
        out = []
        for index in sorted(found):
            target = vps[index]
            if target.requires(scope):  # drawn from its occupancy (VP.requires)
                end, name = found[index]
                out.append((end, name, target))
        return out
