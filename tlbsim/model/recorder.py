"""The run's records as the model writes them: the shootdown recorder and the per-VP tables.

Owns one question: "what does a shootdown's row say?". The model reports to
the ``ShootdownRecorder`` through a few entry points and never writes a row
itself; the row handle a policy carries (``_Shootdown``) is private to this
module. Entry points, in the order a shootdown meets them:

  started -> [call_issued | targets_named | ipis_sent] -> flushed* / deferred*
  -> [suspended -> resumed | waited]* -> in_hypervisor* -> [call_returned]
  -> completed   (or finish(): INCOMPLETE)

``flushed`` is also how a deferred target's flush lands when the target next
runs, which may be after ``completed``: the recorder adds it to the row then.

Rows live in typed arrays (8 bytes a value; strings become small-int codes),
so a run can record millions of shootdowns; ``Records`` holds what one run
produced as plain columns (plain Python and arrays: the model imports no
pandas); tlbsim.records makes the tidy DataFrames and the summary, once, at
the end.

With a ``spill`` callback the recorder hands its rows over in chunks as the
run goes (the caller writes them to Parquet: results.ShootdownSpill) and keeps
in memory only the two columns a late deferred flush can still change and
the ids (24 bytes a row instead of 173). The model itself does no I/O.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from operator import attrgetter, sub

from tlbsim.hv import HvStatus
from tlbsim.model.accounting import EXIT_REASONS, TIME_COLUMNS

SHOOTDOWN_COLUMNS = (
    "id", "partition", "initiator_vp", "policy", "origin", "address_space", "pages", "call_code", "flags", "n_targets",
    "running_targets", "deferred_targets", "ipis", "arrival_us", "issue_us", "complete_us", "latency_us",
    "queue_us", "suspensions", "reissues", "continuations", "suspended_us", "hypercall_us", "refill_entries",
    "collateral_entries",
    "status", "hypercall_status", "stuck_on",
)
_INT_COLUMNS = ("id", "partition", "initiator_vp", "address_space", "pages", "call_code", "flags", "n_targets",
                "running_targets", "deferred_targets", "ipis", "suspensions", "reissues", "continuations")
_FLOAT_COLUMNS = ("arrival_us", "issue_us", "complete_us", "latency_us", "queue_us", "suspended_us",
                  "hypercall_us", "refill_entries", "collateral_entries")
_STR_COLUMNS = ("policy", "origin", "status", "hypercall_status", "stuck_on")

_ROW_CHUNK = 1024
#: _Shootdown attribute of each column, where the names differ
_SOURCE = {"initiator_vp": "initiator"}
#: columns that can still change after the row is recorded (a deferred target flushing late)
_PATCHED = ("refill_entries", "collateral_entries")
_STATUS_NAMES = {s: s.name for s in HvStatus}


class _Shootdown:
    """One shootdown in flight: the row handle. Private to the recorder: the
    model passes it back to the entry points and reads only ``id`` and
    ``targets`` (for the invariant checks).

    The counters start at class-level defaults and become instance
    attributes only when a shootdown changes them, so starting a shootdown
    sets nine attributes, not twenty-six."""

    complete_us = math.nan
    call_code = 0
    flags = 0
    n_targets = 0
    running_targets = 0
    deferred_targets = 0
    ipis = 0
    suspensions = 0
    reissues = 0
    continuations = 0
    suspended_us = 0.0
    hypercall_us = 0.0
    refill_entries = 0.0
    collateral_entries = 0.0
    status = "IN_PROGRESS"
    hypercall_status = ""  # the flush hypercall's HV_STATUS ("" without one)
    stuck_on = ""
    row = -1  # its row once recorded

    def __init__(self, sid: int, initiator: int, policy: str, request, now: float, targets, partition: int):
        self.id = sid
        self.partition = partition
        self.initiator = initiator
        self.policy = policy
        self.address_space = request.address_space
        self.pages = request.pages
        self.arrival_us = request.arrival_us
        self.issue_us = now
        self.origin = request.origin
        self.targets = targets


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
        if not isinstance(values, tuple | list):
            values = list(values)
        try:  # values seen before: the dict's own lookup, no Python call a row
            codes = array("b", map(self.table.__getitem__, values))
        except KeyError:  # a new value in the batch: the whole batch the slow way
            codes = array("b", map(self._code, values))
        self.codes.extend(codes)


_PAGES, _FLAGS, _COMPLETE, _ISSUE, _ARRIVAL = (
    attrgetter(a) for a in ("pages", "flags", "complete_us", "issue_us", "arrival_us"))


class ShootdownRecorder:
    """The one writer of shootdown rows (see the module docstring).

    ``completed`` keeps the finished row handle and gives it its row number;
    every 1,024 rows the kept handles are moved into the typed arrays column
    by column (C-level loops: much cheaper than two dozen appends per row).
    The refill columns are written at once and stay open for late flushes."""

    def __init__(self, spill=None, spill_rows: int = 1 << 16):
        """``spill(columns)``, if given, receives every ``spill_rows`` recorded rows in order (all
        columns but the patched ones, as ``columns()`` gives them) and owns them from then on."""
        self._spill = spill
        self._spill_rows = spill_rows
        self._spilled_ids = array("q") if spill is not None else None
        self.ints = {c: array("q") for c in _INT_COLUMNS}
        self.floats = {c: array("d") for c in _FLOAT_COLUMNS}
        self.strings = {c: _Codes() for c in _STR_COLUMNS}
        self.in_flight: dict[int, _Shootdown] = {}
        self.issued = 0
        self._chunk: list[_Shootdown] = []
        self._rows = 0
        self._moves: tuple = ()
        self._bind_moves()

    def _bind_moves(self) -> None:
        """The sinks of every column filled from the kept handles, for the current arrays, and one
        getter of all their attributes (a tuple a row: one C call a row instead of one a column)."""
        sinks, names = [], []
        for columns, by_name in ((_INT_COLUMNS, self.ints), (_FLOAT_COLUMNS, self.floats),
                                 (_STR_COLUMNS, self.strings)):
            for c in columns:
                if c not in ("pages", "flags", "latency_us", "queue_us", *_PATCHED):
                    sinks.append(by_name[c])
                    names.append(_SOURCE.get(c, c))
        self._moves = (sinks, attrgetter(*names))

    # ------------------------------------------------------------ entry points
    def started(self, initiator: int, policy: str, request, now: float, targets, partition: int = 0) -> _Shootdown:
        """VP ``initiator`` of guest ``partition`` starts a shootdown of ``request`` whose targets are
        the VPs ``targets`` (VP objects, kept by reference for the invariant checks; the recorder
        reads nothing of them)."""
        sd = _Shootdown(self.issued, initiator, policy, request, now, targets, partition)
        self.issued += 1
        self.in_flight[sd.id] = sd
        return sd

    def call_issued(self, shootdown: _Shootdown, call_code: int, flags: int, n_targets: int) -> None:
        """A flush hypercall was issued for it (``n_targets``: the VPs it names, the caller excluded)."""
        shootdown.call_code = call_code
        shootdown.flags = flags
        shootdown.n_targets = n_targets

    def targets_named(self, shootdown: _Shootdown, n_targets: int) -> None:
        """The guest chose ``n_targets`` targets without a flush hypercall (KVM PV flush)."""
        shootdown.n_targets = n_targets

    def ipis_sent(self, shootdown: _Shootdown, count: int) -> None:
        shootdown.ipis += count
        if count > shootdown.n_targets:
            shootdown.n_targets = count

    def flushed(self, shootdown: _Shootdown, required: float, removed: float) -> None:
        """A VP's TLB was flushed for it (the initiator's own flush, a target
        now, or a deferred target at its next entry, possibly after
        ``completed``): ``required`` entries the flush had to remove,
        ``removed`` entries that went (the rest are collateral)."""
        if shootdown.row < 0:
            shootdown.refill_entries += required
            shootdown.collateral_entries += removed - required
        else:
            self.floats["refill_entries"][shootdown.row] += required
            self.floats["collateral_entries"][shootdown.row] += removed - required

    def running_flushed(self, shootdown: _Shootdown, flushed: list[tuple[float, float]]) -> None:
        """The hypervisor flushed the running targets on their LPs:
        ``flushed`` holds (required, removed) per target, in target order
        (the same as one ``flushed`` call each, in one call)."""
        shootdown.running_targets = len(flushed)
        refill, collateral = shootdown.refill_entries, shootdown.collateral_entries
        for required, removed in flushed:
            refill += required
            collateral += removed - required
        shootdown.refill_entries, shootdown.collateral_entries = refill, collateral

    def running_flushed_pages(self, shootdown: _Shootdown, required: list[float]) -> None:
        """``running_flushed`` for a page flush (exact: removed = required): ``required`` per running
        target, in target order. The collateral sum is left as it is (it would add +0.0 per target)."""
        shootdown.running_targets = len(required)
        refill = shootdown.refill_entries
        for r in required:
            refill += r
        shootdown.refill_entries = refill

    def deferred(self, shootdown: _Shootdown, count: int = 1) -> None:
        """``count`` targets were not on an LP: their flush waits for their next entry."""
        shootdown.deferred_targets += count

    def in_hypervisor(self, shootdown: _Shootdown, cost_us: float) -> None:
        """The initiator spent ``cost_us`` in a flush hypercall for it."""
        shootdown.hypercall_us += cost_us

    def suspended(self, shootdown: _Shootdown) -> None:
        """Its caller was suspended on a locked TLB."""
        shootdown.suspensions += 1

    def resumed(self, shootdown: _Shootdown, suspended_us: float) -> None:
        """Its caller was resumed after ``suspended_us`` and reissues the call."""
        shootdown.suspended_us += suspended_us
        shootdown.reissues += 1

    def continued(self, shootdown: _Shootdown) -> None:
        """Its rep call returned to the caller at a rep boundary and was continued (a new entry)."""
        shootdown.continuations += 1

    def waited(self, shootdown: _Shootdown, suspended_us: float) -> None:
        """Its caller waited ``suspended_us`` for lock holders and goes on without reissuing (OpenHCL)."""
        shootdown.suspended_us += suspended_us

    def call_returned(self, shootdown: _Shootdown, status: HvStatus) -> None:
        """Its flush hypercall returned ``status`` (the shootdown's own status may differ:
        a guest that falls back to IPIs after a failure still completes)."""
        shootdown.hypercall_status = _STATUS_NAMES.get(status) or str(status)

    def completed(self, shootdown: _Shootdown, status: HvStatus, now: float) -> None:
        shootdown.complete_us = now
        shootdown.status = _STATUS_NAMES.get(status) or str(status)
        del self.in_flight[shootdown.id]
        self._keep(shootdown)

    def finish(self) -> None:
        """The run ended: every shootdown still in flight becomes an INCOMPLETE row."""
        for sd in sorted(self.in_flight.values(), key=lambda s: s.id):
            sd.status = "INCOMPLETE"
            if not sd.stuck_on and sd.suspensions:
                sd.stuck_on = "suspended on a locked TLB"
            self._keep(sd)
        self.in_flight.clear()

    # ------------------------------------------------------------ rows
    def _keep(self, sd: _Shootdown) -> None:
        sd.row = self._rows
        self._rows += 1
        f = self.floats
        f["refill_entries"].append(sd.refill_entries)
        f["collateral_entries"].append(sd.collateral_entries)
        self._chunk.append(sd)
        if len(self._chunk) >= _ROW_CHUNK:
            self._move_rows()

    def _move_rows(self) -> None:
        chunk = self._chunk
        if not chunk:
            return
        sinks, get = self._moves
        for sink, column in zip(sinks, zip(*map(get, chunk), strict=True), strict=True):  # rows -> columns
            sink.extend(column)
        self.ints["pages"].extend([0 if p is None else p for p in map(_PAGES, chunk)])  # 0: whole space
        self.ints["flags"].extend(map(int, map(_FLAGS, chunk)))
        self.floats["latency_us"].extend(map(sub, map(_COMPLETE, chunk), map(_ISSUE, chunk)))
        self.floats["queue_us"].extend(map(sub, map(_ISSUE, chunk), map(_ARRIVAL, chunk)))
        self._chunk = []
        if self._spill is not None and len(self.ints["id"]) >= self._spill_rows:
            self._spill_out()

    def _spill_out(self) -> None:
        """Hand the rows kept since the last spill to ``spill`` and start new arrays (the patched
        columns stay: a late deferred flush may still add to any row)."""
        ids = self.ints["id"]
        columns = {c: v for c, v in self._columns().items() if c not in _PATCHED}
        self._spill(columns)
        self._spilled_ids.extend(ids)
        self.ints = {c: array("q") for c in _INT_COLUMNS}
        self.floats = {c: (v if c in _PATCHED else array("d")) for c, v in self.floats.items()}
        for codes in self.strings.values():
            codes.codes = array("b")
        self._bind_moves()

    def ids(self) -> list[int]:
        """Ids of every recorded row (spilled ones included) and of every shootdown still in flight."""
        self._move_rows()
        spilled = list(self._spilled_ids) if self._spilled_ids is not None else []
        return spilled + list(self.ints["id"]) + list(self.in_flight)

    def columns(self) -> dict:
        """Every column of every recorded row; when spilling, the rest is spilled now and only the
        patched columns (for all rows) are returned."""
        self._move_rows()
        if self._spill is not None:
            self._spill_out()
            return {c: self.floats[c] for c in _PATCHED}
        return self._columns()

    def _columns(self) -> dict:
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


@dataclass
class Records:
    """What one run produced, as plain columns; results.Result makes DataFrames of it."""

    shootdowns: dict[str, list] = field(default_factory=dict)  # spilled: only the patched columns, all rows
    vps: dict[str, list] = field(default_factory=dict)
    exits: dict[str, list] = field(default_factory=dict)
    duration_us: float = 0.0
    events: int = 0
    requests_waiting: int = 0
    host: dict[str, int] = field(default_factory=dict)
    vf: dict[str, list] | None = None  # one row per PF call (VF_COLUMNS), None when the VF model is off
    vf_stats: dict[str, int] = field(default_factory=dict)


def vp_tables(vps) -> tuple[dict[str, list], dict[str, list]]:
    """The ``vps`` table (one row per VP: time per accounting column, refills,
    flushes) and the ``exits`` table (per VP and exit reason) of settled VPs."""
    table: dict[str, list] = {"partition": [], "vp": [], "address_space": []}
    for name in TIME_COLUMNS:
        table[f"{name}_us"] = []
    extras = ("refill_entries", "collateral_entries", "evicted_entries", "flushes_applied", "deferred_applied",
              "deferred_pending", "spin_exits", "spin_exit_us", "spin_yields", "ipi_send_us", "icr_writes",
              "pv_ipi_hypercalls", "sched_yield_hypercalls", "sched_yield_us", "ipis_received", "eoi_traps",
              "ipi_interrupt_us", "lock_holder_preemptions", "exits")
    for extra in extras:
        table[extra] = []
    exits: dict[str, list] = {"partition": [], "vp": [], "reason": [], "code": [], "count": [], "time_us": []}
    for vp in vps:
        partition = vp.part.index
        table["partition"].append(partition)
        table["vp"].append(vp.index)
        table["address_space"].append(vp.address_space)
        for name, value in zip(TIME_COLUMNS, vp.time_columns(), strict=True):
            table[f"{name}_us"].append(value)
        table["refill_entries"].append(vp.refill_entries)
        table["collateral_entries"].append(vp.collateral_entries)
        table["evicted_entries"].append(vp.evicted_entries)
        table["flushes_applied"].append(vp.flushes_applied)
        table["deferred_applied"].append(vp.deferred_applied)
        table["deferred_pending"].append(len(vp.deferred))
        table["spin_exits"].append(vp.spin_exits)
        table["spin_exit_us"].append(vp.spin_exit_us)
        table["spin_yields"].append(vp.spin_yields)
        table["ipi_send_us"].append(vp.ipi_send_us)
        for name in ("icr_writes", "pv_ipi_hypercalls", "sched_yield_hypercalls", "sched_yield_us", "ipis_received",
                     "eoi_traps", "ipi_interrupt_us", "lock_holder_preemptions"):
            table[name].append(getattr(vp, name))
        table["exits"].append(sum(vp.exit_count))
        for i, reason in enumerate(EXIT_REASONS):
            exits["partition"].append(partition)
            exits["vp"].append(vp.index)
            exits["reason"].append(reason.name)
            exits["code"].append(int(reason))
            exits["count"].append(vp.exit_count[i])
            exits["time_us"].append(vp.exit_time[i])
    return table, exits
