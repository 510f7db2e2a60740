"""Shootdown arrivals per VP: open loop (Poisson, optionally in bursts, or a
trace) or closed loop.

A request carries its arrival time, the address space to flush and the
number of pages (None: the whole address space).

- Open loop (``PoissonArrivals``, ``TraceArrivals``): arrival times are
  drawn (or read) independently of what the VP does, so every policy sees
  the same offered load at one seed (common random numbers). A request that
  arrives while its VP cannot serve it (in a shootdown, an exit, off its LP)
  queues; its queueing delay is the shootdown's ``queue_us``.
- Closed loop (``ClosedLoop``): the VP does ``work_us()`` of useful guest
  work, then a shootdown, then again (what a benchmark loop does); the figure
  of merit is operations completed per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr call per field
class Request:
    arrival_us: float
    address_space: int
    pages: int | None
    origin: str = "workload"  # or "vf": the VF driver flushing after a configuration change


@dataclass(frozen=True, slots=True)
class TraceEvent:
    time_us: float
    vp: int
    address_space: int  # address-space index (0 .. n-1), as in the sharing pattern
    pages: int  # 0: the whole address space


class PoissonArrivals:
    """Open loop: bursts at Poisson times, whatever the VP is doing."""

    closed = False
    sleep_mean_us = 0.0

    def __init__(self, stream, rate_per_ms: float, burst_size: int, pages: int, full_fraction: float):
        self.stream = stream
        self.gap_mean_us = 1000.0 / rate_per_ms if rate_per_ms > 0 else math.inf
        self.burst_size = burst_size
        self.pages = pages
        self.full_fraction = full_fraction
        self.next_us = stream.exp(self.gap_mean_us)

    def next_time(self) -> float:
        return self.next_us

    def _burst(self, vp, at_us: float, out: list) -> None:
        for _ in range(self.burst_size):
            whole = self.full_fraction > 0 and self.stream.uniform() < self.full_fraction
            out.append(Request(at_us, vp.address_space, None if whole else self.pages))

    def requests(self, vp, now: float) -> list[Request]:
        """Every request that arrived up to ``now``, each with its arrival time."""
        out: list[Request] = []
        while self.next_us <= now:
            self._burst(vp, self.next_us, out)
            self.next_us += self.stream.exp(self.gap_mean_us)
        return out


class ClosedLoop(PoissonArrivals):
    """Closed loop: a shootdown (burst) after each ``work_us()`` of useful guest work."""

    closed = True

    def __init__(self, stream, work_mean_us: float, fixed: bool, burst_size: int, pages: int, full_fraction: float,
                 sleep_mean_us: float = 0.0):
        super().__init__(stream, 0.0, burst_size, pages, full_fraction)
        self.work_mean_us = work_mean_us
        self.fixed = fixed
        self.sleep_mean_us = sleep_mean_us  # the thread sleeps after each operation (0: never)

    def sleep_us(self) -> float:
        return self.stream.exp(self.sleep_mean_us)

    def work_us(self) -> float:
        return self.work_mean_us if self.fixed else self.stream.exp(self.work_mean_us)

    def requests(self, vp, now: float) -> list[Request]:
        out: list[Request] = []
        self._burst(vp, now, out)
        return out


class TraceArrivals:
    """Replays the trace rows of one VP, in time order (open loop)."""

    closed = False
    sleep_mean_us = 0.0

    def __init__(self, events: list[TraceEvent], cr3_of):
        self.events = sorted(events, key=lambda e: e.time_us)
        self.cr3_of = cr3_of
        self.i = 0

    def next_time(self) -> float:
        return self.events[self.i].time_us if self.i < len(self.events) else math.inf

    def requests(self, vp, now: float) -> list[Request]:
        out = []
        while self.i < len(self.events) and self.events[self.i].time_us <= now:
            e = self.events[self.i]
            out.append(Request(e.time_us, self.cr3_of(e.address_space), e.pages or None))
            self.i += 1
        return out
