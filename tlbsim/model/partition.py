"""Wires one run: environment, host, VPs, hypervisor, policy; runs it and
returns plain records (lists and dicts). No file I/O, no printing."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from operator import attrgetter, sub

import simpy

from tlbsim import hv
from tlbsim.config import Config, ExitSpec
from tlbsim.model import InvariantError, rng
from tlbsim.model.guest import Shootdown, make_policy
from tlbsim.model.host import Host
from tlbsim.model.hypervisor import Hypervisor
from tlbsim.model.locks import VsmTlbLock
from tlbsim.model.vf import VF_COLUMNS, PhysicalFunction, VirtualFunction
from tlbsim.model.vp import EXIT_REASONS, GUEST, TIME_COLUMNS, VP
from tlbsim.model.workload import PoissonArrivals, TraceArrivals, TraceEvent

SHOOTDOWN_COLUMNS = (
    "id", "initiator_vp", "policy", "origin", "address_space", "pages", "call_code", "flags", "n_targets",
    "running_targets", "deferred_targets", "ipis", "arrival_us", "issue_us", "complete_us", "latency_us",
    "suspensions", "reissues", "suspended_us", "hypercall_us", "refill_entries", "collateral_entries",
    "status", "stuck_on",
)


_INT_COLUMNS = ("id", "initiator_vp", "address_space", "pages", "call_code", "flags", "n_targets",
                "running_targets", "deferred_targets", "ipis", "suspensions", "reissues")
_FLOAT_COLUMNS = ("arrival_us", "issue_us", "complete_us", "latency_us", "suspended_us", "hypercall_us",
                  "refill_entries", "collateral_entries")
_STR_COLUMNS = ("policy", "origin", "status", "stuck_on")


_ROW_CHUNK = 1024
#: Shootdown attribute of each column, where the names differ
_SOURCE = {"initiator_vp": "initiator"}
#: columns that can still change after the row is recorded (see ShootdownRecorder.add_refills)
_PATCHED = ("refill_entries", "collateral_entries")


class _Codes:
    """A string column: a small-int code per row, each distinct value stored once."""

    __slots__ = ("codes", "table")

    def __init__(self):
        self.codes = array("b")
        self.table: dict[str, int] = {}

    def _code(self, value: str) -> int:
        code = self.table.get(value)
        if code is None:
            if len(self.table) >= 127:
                raise ValueError(f"too many distinct values: {value!r}")
            code = self.table[value] = len(self.table)
        return code

    def extend(self, values) -> None:
        self.codes.extend(map(self._code, values))


class ShootdownRecorder:
    """One row per shootdown, in typed arrays (8 bytes a value; strings
    become codes), so a run can record millions of shootdowns.

    ``add`` keeps the completed Shootdown and gives it its row number; every
    1,024 rows the kept shootdowns are moved into the arrays column by column
    (C-level loops: much cheaper than two dozen appends per row). The refill
    columns are written at once and stay open: a target that was not on an
    LP flushes at its next dispatch, often after the shootdown returned, and
    its refills are added to the shootdown's row then (``add_refills``)."""

    def __init__(self):
        self.ints = {c: array("q") for c in _INT_COLUMNS}
        self.floats = {c: array("d") for c in _FLOAT_COLUMNS}
        self.strings = {c: _Codes() for c in _STR_COLUMNS}
        self._chunk: list = []
        self._rows = 0
        self._moves = []  # (sink, getter) of every column filled from the kept shootdowns
        for columns, sinks in ((_INT_COLUMNS, self.ints), (_FLOAT_COLUMNS, self.floats), (_STR_COLUMNS, self.strings)):
            for c in columns:
                if c not in ("pages", "flags", "latency_us", *_PATCHED):
                    self._moves.append((sinks[c], attrgetter(_SOURCE.get(c, c))))

    def add(self, sd) -> None:
        sd.row = self._rows
        self._rows += 1
        f = self.floats
        f["refill_entries"].append(sd.refill_entries)
        f["collateral_entries"].append(sd.collateral_entries)
        self._chunk.append(sd)
        if len(self._chunk) >= _ROW_CHUNK:
            self._move_rows()

    def add_refills(self, row: int, refill_entries: float, collateral_entries: float) -> None:
        """A flush of a recorded shootdown applied late (at a deferred target's dispatch)."""
        self.floats["refill_entries"][row] += refill_entries
        self.floats["collateral_entries"][row] += collateral_entries

    def _move_rows(self) -> None:
        chunk = self._chunk
        if not chunk:
            return
        for sink, get in self._moves:
            sink.extend(map(get, chunk))
        self.ints["pages"].extend([0 if p is None else p for p in map(_PAGES, chunk)])  # 0: whole space
        self.ints["flags"].extend(map(int, map(_FLAGS, chunk)))
        self.floats["latency_us"].extend(map(sub, map(_COMPLETE, chunk), map(_ISSUE, chunk)))
        self._chunk = []

    def ids(self) -> list[int]:
        self._move_rows()
        return list(self.ints["id"])

    def columns(self) -> dict:
        self._move_rows()
        out = {}
        for c in SHOOTDOWN_COLUMNS:
            if c in self.ints:
                out[c] = self.ints[c]
            elif c in self.floats:
                out[c] = self.floats[c]
            else:
                s = self.strings[c]
                out[c] = (s.codes, list(s.table))  # (codes, categories)
        return out


_PAGES, _FLAGS, _COMPLETE, _ISSUE = (attrgetter(a) for a in ("pages", "flags", "complete_us", "issue_us"))


def cr3_of(as_index: int) -> int:
    """The CR3 value that names address space ``as_index``."""
    return (as_index + 1) << 12


@dataclass
class Records:
    """What one run produced, as plain columns; results.Result makes DataFrames of it."""

    shootdowns: dict[str, list] = field(default_factory=dict)
    vps: dict[str, list] = field(default_factory=dict)
    exits: dict[str, list] = field(default_factory=dict)
    duration_us: float = 0.0
    events: int = 0
    requests_waiting: int = 0
    host: dict[str, int] = field(default_factory=dict)
    vf: dict[str, list] | None = None  # one row per PF call (VF_COLUMNS), None when the VF model is off
    vf_stats: dict[str, int] = field(default_factory=dict)


class Partition:
    def __init__(self, config: Config, seed: int = 0, trace: list[TraceEvent] | None = None,
                 vf_trace: dict[int, list[tuple[float, int]]] | None = None):
        self.config = config
        self.env = simpy.Environment()
        p = config.partition
        w = config.workload
        self.host = Host(self.env, min(p.lps, p.vps), p.slice_us)
        self.hypervisor = Hypervisor(self)
        self.policy = make_policy(w.policy, self)
        specs = config.exits.specs()
        self.exit_specs = [
            specs[r.name.lower()] if r.name.lower() in specs else ExitSpec(0.0, config.costs.vmexit_roundtrip_us)
            for r in EXIT_REASONS
        ]
        self.recorder = ShootdownRecorder()
        self.in_flight: dict[int, Shootdown] = {}
        self.memory_exits = 0  # VPs emulating a MemoryAccess exit now (TlbFlushInhibit may be held)
        self._next_id = 0

        as_index = [self._as_index(i) for i in range(p.vps)]
        self.sharers: dict[int, list[VP]] = {}
        streams = rng.vp_streams(seed, p.vps)
        initiators = set(w.initiators) if w.initiators else set(range(p.vps))
        vsm_vps = set(config.locks.vsm_vps) if config.locks.vsm_vps else set(range(p.vps))
        per_vp_trace: dict[int, list[TraceEvent]] = {}
        for e in trace or ():
            per_vp_trace.setdefault(e.vp, []).append(e)
        self.vps: list[VP] = []
        for i in range(p.vps):
            if trace is not None:
                arrivals = TraceArrivals(per_vp_trace.get(i, []), cr3_of)
            else:
                rate = w.rate_per_ms if i in initiators else 0.0
                arrivals = PoissonArrivals(streams[i]["workload"], rate, w.burst_size, w.pages,
                                           w.full_flush_fraction)
            lk = config.locks
            vsm = (VsmTlbLock(streams[i]["vsm"], lk.vsm_rate_per_ms, lk.vsm_hold_mean_us,
                              lk.vsm_hold_distribution == "fixed")
                   if lk.vsm_rate_per_ms > 0 and i in vsm_vps else None)
            vp = VP(self, i, cr3_of(as_index[i]), streams[i], arrivals, vsm)
            self.vps.append(vp)
            self.sharers.setdefault(vp.address_space, []).append(vp)
        self._mask_targets = hv.mask_to_vps(w.processor_mask) if w.processor_mask else None
        self._targets: dict[tuple[int, int], tuple[list[VP], tuple[int, ...]]] = {}

        v = config.vf
        self.pf: PhysicalFunction | None = None
        self.vfs: list[VirtualFunction] = []
        if v.count:
            vf_streams, pf_stream = rng.vf_streams(seed, v.count)
            self.pf = PhysicalFunction(self.env, v, pf_stream)
            for j in range(v.count):
                vp = self.vps[v.service_vps[j % len(v.service_vps)]]
                replay = (vf_trace or {}).get(j, []) if vf_trace is not None else None
                self.vfs.append(VirtualFunction(self.env, j, vp, self.pf, v, vf_streams[j],
                                                config.run.check_invariants, replay))

    def _as_index(self, vp: int) -> int:
        w = self.config.workload
        if w.sharing == "all":
            return 0
        if w.sharing == "groups":
            return vp // w.group_size
        return vp

    # ------------------------------------------------------------ policy API
    def targets_of(self, vp: VP, address_space: int) -> tuple[list[VP], tuple[int, ...]]:
        """The other VPs that may cache ``address_space`` (Linux's mm_cpumask),
        and their indices. Fixed for a run: computed once per (VP, address space)."""
        key = (vp.index, address_space)
        found = self._targets.get(key)
        if found is None:
            if self._mask_targets is not None:
                vps = [self.vps[i] for i in self._mask_targets if i != vp.index]
            else:
                vps = [t for t in self.sharers.get(address_space, ()) if t is not vp]
            found = self._targets[key] = (vps, tuple(t.index for t in vps))
        return found

    def new_shootdown(self, vp: VP, policy: str, req) -> Shootdown:
        sd = Shootdown(self._next_id, vp.index, policy, req, self.env.now)
        self._next_id += 1
        self.in_flight[sd.id] = sd
        return sd

    def complete(self, sd: Shootdown) -> None:
        sd.complete_us = self.env.now
        del self.in_flight[sd.id]
        if self.config.run.check_invariants:
            self._check_flush_guarantee(sd)
        self.recorder.add(sd)

    # ------------------------------------------------------------ invariants
    def _check_flush_guarantee(self, sd: Shootdown) -> None:
        """After a flush returns, every targeted VP has had the flush applied,
        or has it pending and is not running guest code."""
        if sd.status not in ("SUCCESS",):
            return
        for i in sd.targets:
            t = self.vps[i]
            if sd.id in t.applied_ids:
                continue
            pending = any(d[0] is sd for d in t.deferred)
            if not pending or t.state == GUEST:
                raise InvariantError(
                    f"shootdown {sd.id} by VP {sd.initiator} returned at {self.env.now} us but target VP {i} "
                    f"neither flushed nor holds it pending (state {t.state})"
                )

    def _check_end(self, duration: float) -> None:
        for vp in self.vps:
            total = sum(vp.acc)
            if not math.isclose(total, duration, rel_tol=1e-9, abs_tol=1e-6):
                raise InvariantError(f"VP {vp.index}: time by state sums to {total} us, not {duration} us")
        ids = self.recorder.ids() + list(self.in_flight)
        if len(ids) != len(set(ids)) or len(ids) != self._next_id:
            raise InvariantError(f"shootdowns lost or duplicated: {len(ids)} recorded of {self._next_id} issued")
        for vf in self.vfs:
            vf.check_end()

    # ------------------------------------------------------------ running
    def run(self, progress=None, steps: int = 100) -> Records:
        """Run to the configured duration. ``progress(fraction)``, if given, is
        called as simulated time passes each 1/``steps`` of the duration, by a
        process of its own: the model's events keep their relative order, so
        the records are identical, and its events are not counted."""
        duration = self.config.partition.duration_us
        reporting_events = 0
        if progress is not None:
            self.env.process(self._report(progress, steps, duration))
            reporting_events = steps + 1  # its Initialize event and one timeout per step (the last never fires)
        self.env.run(until=duration)
        if progress is not None:
            progress(1.0)
        for vp in self.vps:
            vp.settle()
        if self.config.run.check_invariants:
            self._check_end(duration)
        return self._records(duration, _events_processed(self.env) - reporting_events)

    def _report(self, progress, steps: int, duration: float):
        for i in range(1, steps + 1):
            yield self.env.timeout(duration / steps)
            progress(i / steps)

    def _records(self, duration: float, events: int) -> Records:
        for sd in sorted(self.in_flight.values(), key=lambda s: s.id):
            sd.status = "INCOMPLETE"
            if not sd.stuck_on and sd.suspensions:
                sd.stuck_on = "suspended on a locked TLB"
            self.recorder.add(sd)
        cols = self.recorder.columns()
        vps: dict[str, list] = {"vp": [], "address_space": []}
        for name in TIME_COLUMNS:
            vps[f"{name}_us"] = []
        for extra in ("refill_entries", "collateral_entries", "flushes_applied", "deferred_applied", "exits"):
            vps[extra] = []
        exits: dict[str, list] = {"vp": [], "reason": [], "code": [], "count": [], "time_us": []}
        for vp in self.vps:
            vps["vp"].append(vp.index)
            vps["address_space"].append(vp.address_space)
            for i, name in enumerate(TIME_COLUMNS):
                vps[f"{name}_us"].append(vp.acc[i])
            vps["refill_entries"].append(vp.refill_entries)
            vps["collateral_entries"].append(vp.collateral_entries)
            vps["flushes_applied"].append(vp.flushes_applied)
            vps["deferred_applied"].append(vp.deferred_applied)
            vps["exits"].append(sum(vp.exit_count))
            for i, reason in enumerate(EXIT_REASONS):
                exits["vp"].append(vp.index)
                exits["reason"].append(reason.name)
                exits["code"].append(int(reason))
                exits["count"].append(vp.exit_count[i])
                exits["time_us"].append(vp.exit_time[i])
        vf_rows = None
        vf_stats: dict[str, int] = {}
        if self.vfs:
            rows = [r for vf in self.vfs for r in vf.rows()]
            vf_rows = {c: [r[i] for r in rows] for i, c in enumerate(VF_COLUMNS)}
            vf_stats = {
                "vf_notifications": sum(len(vf.notifications) for vf in self.vfs),
                "vf_notifications_dropped": sum(n.dropped for vf in self.vfs for n in vf.notifications),
                "vf_block_reads": sum(len(r) for vf in self.vfs for r in vf.reads),
                "pf_other_oids": self.pf.other_oids,
                "vf_oid_backlog_max": max(vf.oid_backlog_max for vf in self.vfs),
            }
        return Records(
            vf=vf_rows, vf_stats=vf_stats,
            shootdowns=cols, vps=vps, exits=exits, duration_us=duration,
            events=events,
            requests_waiting=sum(len(vp.requests) for vp in self.vps),
            host={"dispatches": self.host.dispatches, "preemptions": self.host.preemptions},
        )


def _events_processed(env) -> int:
    """Events scheduled so far: SimPy numbers every scheduled event from an
    itertools.count, whose repr is ``count(N)``."""
    text = repr(getattr(env, "_eid", "count(0)"))
    return int(text[text.index("(") + 1 : text.rindex(")")] or 0)


def simulate_records(config: Config, seed: int = 0, trace: list[TraceEvent] | None = None,
                     vf_trace: dict[int, list[tuple[float, int]]] | None = None, progress=None) -> Records:
    return Partition(config, seed, trace, vf_trace).run(progress)
