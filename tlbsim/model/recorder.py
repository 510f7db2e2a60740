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
the ids. The model itself does no I/O.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from operator import attrgetter, sub

from tlbsim.hv import HvStatus
from tlbsim.model import InvariantError
from tlbsim.model.accounting import (
    DESCHEDULED,
    EXIT,
    EXIT_REASONS,
    FLUSH,
    HYPERCALL,
    N_STATES,
    SPINNING,
    SUSPENDED,
    TIME_COLUMNS,
)
from tlbsim.model.vp_arrays import row_sum

#: Latency anatomy: where the initiator's time went between issuing the shootdown and its completion
#: (the run's end for one still in flight), by the state it was in. They add up to ``latency_us``
#: (an invariant). See docs/model.md "Latency anatomy" for the function that produces each.
ANATOMY_COLUMNS = (
    "local_flush_us",  # its own TLB flush (INVLPG / CR3 reload)
    "ipi_send_us",  # sending IPIs (trapped ICR writes or KVM's PV send-IPI hypercall), and Linux's PV sched yield
    "hypercall_us",  # in the flush hypercall: entry, decode, the VP-set walk, range reads, continuations...
    "fanout_us",  # ... of which reaching the running targets: IPI sends and the slowest acknowledgement, or a broadcast
    "spinning_us",  # spinning on its LP: for IPI acks (csd_lock_wait), or for a TLB lock about to lift
    "spin_exit_us",  # pause-loop exits / long spin wait notifications while spinning
    "suspended_us",  # suspended off its LP in a hypercall that met a locked TLB (or halted for OpenHCL's holders)
    "descheduled_us",  # runnable, waiting for an LP: preempted, after a directed yield, or back from a suspension
    "interrupts_us",  # handling other shootdowns' IPIs meanwhile (the interruption, their flush handlers)
    "other_us",  # anything else on the way (VTL1, VF work, other exits)
)
#: Anatomy columns that partition latency_us (fanout_us is a part of hypercall_us)
ANATOMY_PARTS = tuple(c for c in ANATOMY_COLUMNS if c != "fanout_us")

SHOOTDOWN_COLUMNS = (
    "id", "partition", "initiator_vp", "policy", "origin", "address_space", "pages", "call_code", "flags", "n_targets",
    "running_targets", "deferred_targets", "off_lp_targets", "ipis", "arrival_us", "issue_us", "complete_us",
    "latency_us", "queue_us", "suspensions", "reissues", "continuations",
    *ANATOMY_COLUMNS, "refill_entries", "collateral_entries",
    "status", "hypercall_status", "stuck_on",
)
_INT_COLUMNS = ("id", "partition", "initiator_vp", "address_space", "pages", "call_code", "flags", "n_targets",
                "running_targets", "deferred_targets", "off_lp_targets", "ipis", "suspensions", "reissues",
                "continuations")
_FLOAT_COLUMNS = ("arrival_us", "issue_us", "complete_us", "latency_us", "queue_us", *ANATOMY_COLUMNS,
                  "refill_entries", "collateral_entries")
_STR_COLUMNS = ("policy", "origin", "status", "hypercall_status", "stuck_on")
#: bytes a recorded row takes: 8 a number, a one-byte code a string
ROW_BYTES = 8 * (len(_INT_COLUMNS) + len(_FLOAT_COLUMNS)) + len(_STR_COLUMNS)

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
    sets eleven attributes, not thirty-five."""

    complete_us = math.nan
    call_code = 0
    flags = 0
    n_targets = 0
    running_targets = 0
    deferred_targets = 0
    off_lp_targets = 0
    ipis = 0
    suspensions = 0
    reissues = 0
    continuations = 0
    local_flush_us = ipi_send_us = hypercall_us = fanout_us = spinning_us = spin_exit_us = 0.0
    suspended_us = descheduled_us = interrupts_us = other_us = 0.0
    local_us = 0.0  # the own flush's cost, when it flushes its own TLB
    refill_entries = 0.0
    collateral_entries = 0.0
    status = "IN_PROGRESS"
    hypercall_status = ""  # the flush hypercall's HV_STATUS ("" without one)
    stuck_on = ""
    row = -1  # its row once recorded

    def __init__(self, sid: int, initiator: int, policy: str, request, now: float, targets, partition: int,
                 clock: list[float]):
        self.id = sid
        self.partition = partition
        self.initiator = initiator
        self.policy = policy
        self.address_space = request.address_space
        self.pages = request.pages
        self.arrival_us = request.arrival_us
        self.issue_us = self.queue_end_us = now
        self.origin = request.origin
        self.targets = targets
        self.clock = clock  # the initiator's clock when it started (VP.clock): the anatomy is its change


class StringCodes:
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


_PAGES, _FLAGS, _COMPLETE, _ISSUE, _QUEUE_END, _ARRIVAL = (
    attrgetter(a) for a in ("pages", "flags", "complete_us", "issue_us", "queue_end_us", "arrival_us"))
#: VP.clock's entries after the time per state: the VP's IPI send, PV sched-yield, spin-exit and kick totals
_SEND, _SCHED_YIELD, _SPIN_EXIT, _KICKS = N_STATES, N_STATES + 1, N_STATES + 2, N_STATES + 3
#: an anatomy's sum may differ from the latency by rounding (sums of a few dozen doubles of up to 1e10 us)
_ANATOMY_TOLERANCE = 1e-6


class ShootdownRecorder:
    """The one writer of shootdown rows (see the module docstring).

    ``completed`` keeps the finished row handle and gives it its row number;
    every 1,024 rows the kept handles are moved into the typed arrays column
    by column (C-level loops: much cheaper than two dozen appends per row).
    The refill columns are written at once and stay open for late flushes."""

    def __init__(self, spill=None, spill_rows: int = 1 << 16, check: bool = False):
        """``spill(columns)``, if given, receives every ``spill_rows`` recorded rows in order (all
        columns but the patched ones, as ``columns()`` gives them) and owns them from then on.
        ``check``: every row's target columns and anatomy are checked (``check_row``)."""
        self.check = check
        self._spill = spill
        self._spill_rows = spill_rows
        self._spilled_ids = array("q") if spill is not None else None
        self.ints = {c: array("q") for c in _INT_COLUMNS}
        self.floats = {c: array("d") for c in _FLOAT_COLUMNS}
        self.strings = {c: StringCodes() for c in _STR_COLUMNS}
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
    def started(self, initiator: int, policy: str, request, now: float, targets, partition: int,
                clock: list[float]) -> _Shootdown:
        """VP ``initiator`` of guest ``partition`` starts a shootdown of ``request`` whose targets are
        the VPs ``targets`` (VP objects, kept by reference for the invariant checks; the recorder
        reads nothing of them); ``clock``: the initiator's ``VP.clock()`` now."""
        sd = _Shootdown(self.issued, initiator, policy, request, now, targets, partition, clock)
        self.issued += 1
        self.in_flight[sd.id] = sd
        return sd

    def queued(self, initiator: int, policy: str, request, partition: int, end_us: float) -> None:
        """The run ended with ``request`` arrived at VP ``initiator`` but not started: a QUEUED row,
        censored, whose ``queue_us`` is its queueing delay so far (no issue time, no latency)."""
        sd = _Shootdown(self.issued, initiator, policy, request, math.nan, (), partition, None)
        self.issued += 1
        sd.queue_end_us = end_us
        sd.status = "QUEUED"
        sd.stuck_on = "queued: its VP had not started it"
        self._keep(sd)

    def flushing_locally(self, shootdown: _Shootdown, cost_us: float) -> None:
        """The initiator flushes its own TLB first, for ``cost_us``."""
        shootdown.local_us = cost_us

    def call_issued(self, shootdown: _Shootdown, call_code: int, flags: int, n_targets: int) -> None:
        """A flush hypercall was issued for it (``n_targets``: the VPs it names, the caller excluded)."""
        shootdown.call_code = call_code
        shootdown.flags = flags
        shootdown.n_targets += n_targets

    def targets_named(self, shootdown: _Shootdown, n_targets: int) -> None:
        """The guest reaches ``n_targets`` more targets itself (by IPIs, KVM's PV flush, or lazy-TLB
        deferral), not through a flush hypercall."""
        shootdown.n_targets += n_targets

    def ipis_sent(self, shootdown: _Shootdown, count: int) -> None:
        shootdown.ipis += count

    def ipi_delivered(self, shootdown: _Shootdown, on_lp: bool) -> None:
        """One of its IPIs reached a target on its LP (running) or off it (halted or waiting for an LP:
        it handles the IPI when it runs, and the initiator waits for it)."""
        if on_lp:
            shootdown.running_targets += 1
        else:
            shootdown.off_lp_targets += 1

    def flushed_off_lp(self, shootdown: _Shootdown, count: int) -> None:
        """A broadcast (INVLPGB) flushed ``count`` targets that were not on an LP, at once."""
        shootdown.off_lp_targets += count

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

    def running_flushed_arrays(self, shootdown: _Shootdown, count: int, required, collateral) -> None:
        """``running_flushed`` of ``count`` running targets flushed by the vectorised path
        (vp_arrays.flush_running): ``required`` and ``collateral`` (removed - required; None for a
        page flush: exact) per VP of the flushed span in VP order as numpy arrays, 0.0 for the VPs
        not flushed, summed one addition at a time in that order, as the loop does."""
        shootdown.running_targets = count
        if count:
            shootdown.refill_entries = row_sum(shootdown.refill_entries, required)
            if collateral is not None:
                shootdown.collateral_entries = row_sum(shootdown.collateral_entries, collateral)

    def deferred(self, shootdown: _Shootdown, count: int = 1) -> None:
        """``count`` targets were not on an LP: their flush waits for their next entry."""
        shootdown.deferred_targets += count

    def fanned_out(self, shootdown: _Shootdown, cost_us: float) -> None:
        """A segment of its flush hypercall that spent ``cost_us`` reaching the running targets ended."""
        shootdown.fanout_us += cost_us

    def suspended(self, shootdown: _Shootdown) -> None:
        """Its caller was suspended on a locked TLB."""
        shootdown.suspensions += 1

    def resumed(self, shootdown: _Shootdown) -> None:
        """Its caller was resumed and reissues the call."""
        shootdown.reissues += 1

    def continued(self, shootdown: _Shootdown) -> None:
        """Its rep call returned to the caller at a rep boundary and was continued (a new entry)."""
        shootdown.continuations += 1

    def call_returned(self, shootdown: _Shootdown, status: HvStatus) -> None:
        """Its flush hypercall returned ``status`` (the shootdown's own status may differ:
        a guest that falls back to IPIs after a failure still completes)."""
        shootdown.hypercall_status = _STATUS_NAMES.get(status) or str(status)

    def completed(self, shootdown: _Shootdown, status: HvStatus, now: float, clock: list[float]) -> None:
        """It completed at ``now`` with ``status``; ``clock``: the initiator's ``VP.clock()`` now."""
        shootdown.complete_us = now
        shootdown.status = _STATUS_NAMES.get(status) or str(status)
        self._anatomy(shootdown, clock)
        if self.check:
            self.check_row(shootdown, now)
        del self.in_flight[shootdown.id]
        self._keep(shootdown)

    def finish(self, end_us: float, clock_of) -> None:
        """The run ended at ``end_us``: every shootdown still in flight becomes an INCOMPLETE row, its
        anatomy what its initiator had spent so far (``clock_of(partition, vp)``: that VP's clock)."""
        for sd in sorted(self.in_flight.values(), key=lambda s: s.id):
            sd.status = "INCOMPLETE"
            if not sd.stuck_on and sd.suspensions:
                sd.stuck_on = "suspended on a locked TLB"
            self._anatomy(sd, clock_of(sd.partition, sd.initiator))
            if self.check:
                self.check_row(sd, end_us)
            self._keep(sd)
        self.in_flight.clear()

    @staticmethod
    def _anatomy(sd: _Shootdown, clock: list[float]) -> None:
        """Its anatomy columns: the change of its initiator's clock since it started, by state. An IPI
        send or a spin exit is counted when it starts: one still under way at the run's end is
        counted only as far as it went."""
        d = list(map(sub, clock, sd.clock))
        sd.clock = None
        flush = d[FLUSH]
        local = sd.local_us if sd.local_us < flush else flush
        sd.local_flush_us = local
        sd.interrupts_us = flush - local
        exits = d[EXIT]
        send = d[_SEND] + d[_SCHED_YIELD]
        if send > exits:
            send = exits
        spin_exit = d[_SPIN_EXIT]
        if spin_exit > exits - send:
            spin_exit = exits - send
        kicks = d[_KICKS]  # the interruption (or Canceled exit) before another shootdown's IPI handler
        if kicks > exits - send - spin_exit:
            kicks = exits - send - spin_exit
        sd.ipi_send_us = send
        sd.spin_exit_us = spin_exit
        sd.interrupts_us += kicks
        hypercall = d[HYPERCALL]
        sd.hypercall_us = hypercall
        if sd.fanout_us > hypercall:
            sd.fanout_us = hypercall
        sd.spinning_us = d[SPINNING]
        sd.suspended_us = d[SUSPENDED]
        sd.descheduled_us = d[DESCHEDULED]
        # the states a shootdown rarely meets: guest time, HLT, VF work, VTL1, and exits that are neither
        # sends nor spin exits
        sd.other_us = (exits - send - spin_exit - kicks) + (sum(d[:N_STATES]) - flush - exits - hypercall
                                                            - d[SPINNING] - d[SUSPENDED] - d[DESCHEDULED])

    def check_row(self, sd: _Shootdown, now: float) -> None:
        """The identities every row obeys (docs/model.md "Result tables"): its anatomy adds up to
        its latency (to ``now`` if still in flight); a completed shootdown reached each target in
        exactly one way (n_targets = running + deferred + off-LP); no column is negative."""
        elapsed = now - sd.issue_us
        parts = sum(getattr(sd, c) for c in ANATOMY_PARTS)
        if abs(parts - elapsed) > _ANATOMY_TOLERANCE * max(1.0, elapsed):
            raise InvariantError(f"shootdown {sd.id}: anatomy adds up to {parts!r} us, latency {elapsed!r} us")
        for c in ANATOMY_COLUMNS:
            if getattr(sd, c) < -_ANATOMY_TOLERANCE:
                raise InvariantError(f"shootdown {sd.id}: {c} = {getattr(sd, c)!r} < 0")
        if sd.fanout_us > sd.hypercall_us + _ANATOMY_TOLERANCE:
            raise InvariantError(f"shootdown {sd.id}: fanout_us {sd.fanout_us} > hypercall_us {sd.hypercall_us}")
        if sd.status == "SUCCESS" and sd.n_targets != sd.running_targets + sd.deferred_targets + sd.off_lp_targets:
            raise InvariantError(
                f"shootdown {sd.id} ({sd.policy}): n_targets {sd.n_targets} != running {sd.running_targets} + "
                f"deferred {sd.deferred_targets} + off-LP {sd.off_lp_targets}")

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
        self.floats["queue_us"].extend(map(sub, map(_QUEUE_END, chunk), map(_ARRIVAL, chunk)))
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
    requests_queued: int = 0  # arrivals no VP had started at the end (QUEUED rows)
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
