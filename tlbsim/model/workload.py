"""Shootdown arrivals per VP: Poisson (optionally in bursts) or a trace.

A request carries the address space to flush and the number of pages (None:
the whole address space). Arrivals are in simulated time; a request that
arrives while its VP is not running guest code waits until it does.
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
    def __init__(self, stream, rate_per_ms: float, burst_size: int, pages: int, full_fraction: float):
        self.stream = stream
        self.gap_mean_us = 1000.0 / rate_per_ms if rate_per_ms > 0 else math.inf
        self.burst_size = burst_size
        self.pages = pages
        self.full_fraction = full_fraction

    def next_time(self, now: float) -> float:
        return now + self.stream.exp(self.gap_mean_us)

    def requests(self, vp, now: float) -> list[Request]:
        out = []
        for _ in range(self.burst_size):
            whole = self.full_fraction > 0 and self.stream.uniform() < self.full_fraction
            out.append(Request(now, vp.address_space, None if whole else self.pages))
        return out


class TraceArrivals:
    """Replays the trace rows of one VP, in time order."""

    def __init__(self, events: list[TraceEvent], cr3_of):
        self.events = sorted(events, key=lambda e: e.time_us)
        self.cr3_of = cr3_of
        self.i = 0

    def next_time(self, now: float) -> float:
        return self.events[self.i].time_us if self.i < len(self.events) else math.inf

    def requests(self, vp, now: float) -> list[Request]:
        out = []
        while self.i < len(self.events) and self.events[self.i].time_us <= now:
            e = self.events[self.i]
            out.append(Request(e.time_us, self.cr3_of(e.address_space), e.pages or None))
            self.i += 1
        return out
