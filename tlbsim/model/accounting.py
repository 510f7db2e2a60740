"""Where a VP's time went: its state, time by state, and its exits.

Owns one question: "how much simulated time did this VP spend doing what?".
A VP is in exactly one ``VpState`` at a time; entering a state accounts the
time since the last change to the old one. Guest time is split further, in
separate accounting columns that are not states: the share repaid to the
hypervisor's flush interruptions (``hv_flush``) and to TLB refills
(``refill``), both owed as *debt* when a flush happens and repaid from the
guest time that follows. Guest time also fills the VP's TLB (arithmetic, no
event: see tlb.py).

``TimeAccount`` is the base class of ``vp.VP``: a base class rather than a
member, because the run loop changes state several times per event and an
extra attribute hop there measurably costs (see the bench).
"""

from __future__ import annotations

from enum import IntEnum

from tlbsim.whp import ExitReason


class VpState(IntEnum):
    """What a VP is doing (exactly one at a time)."""

    GUEST = 0  # running guest code
    EXIT = 1  # in an exit handled by the virtualization stack
    HYPERCALL = 2  # in a flush hypercall (the hypervisor's time)
    FLUSH = 3  # the guest's own flush, or its IPI flush handler
    SPINNING = 4  # waiting for IPI acknowledgements on its LP
    SUSPENDED = 5  # in a flush hypercall that found a locked TLB, off its LP
    HALTED = 6  # HLT: off its LP until an interrupt or new work
    DESCHEDULED = 7  # runnable, waiting for an LP
    VF = 8  # the guest's VF back-channel work (IOCTL completion, OID handler, block reads; model/vf.py)
    VTL1 = 9  # running VTL1 (VSM): no VTL0 code, no VTL0 interrupts; holds VSM TlbLocked


N_STATES = len(VpState)
#: Accounting columns of the ``vps`` table, in order: every state, then the two shares of guest time.
TIME_COLUMNS = (*(s.name.lower() for s in VpState), "hv_flush", "refill")

#: Exit reasons counted per VP (rows of the ``exits`` table), in this order.
EXIT_REASONS = (
    ExitReason.MEMORY_ACCESS,
    ExitReason.X64_IO_PORT_ACCESS,
    ExitReason.X64_HALT,
    ExitReason.X64_MSR_ACCESS,
    ExitReason.X64_CPUID,
    ExitReason.X64_INTERRUPT_WINDOW,
    ExitReason.X64_APIC_EOI,
    ExitReason.CANCELED,
    ExitReason.HYPERCALL,
)
_EXIT_INDEX = {r: i for i, r in enumerate(EXIT_REASONS)}
I_MEMORY, I_HALT, I_MSR, I_CANCELED, I_HYPERCALL = (
    _EXIT_INDEX[ExitReason.MEMORY_ACCESS],
    _EXIT_INDEX[ExitReason.X64_HALT],
    _EXIT_INDEX[ExitReason.X64_MSR_ACCESS],
    _EXIT_INDEX[ExitReason.CANCELED],
    _EXIT_INDEX[ExitReason.HYPERCALL],
)

#: What a charge made when an activity starts is counted in (``VP.charge``, trimmed at the run's end by
#: ``VP.trim_charges``): an exit reason's index (the exits table's time), or one of these VP counters.
CHARGE_SEND, CHARGE_SCHED_YIELD, CHARGE_SPIN_EXIT, CHARGE_IPI_INTERRUPT = 100, 101, 102, 103
CHARGE_COUNTERS = {CHARGE_SEND: "ipi_send_us", CHARGE_SCHED_YIELD: "sched_yield_us",
                   CHARGE_SPIN_EXIT: "spin_exit_us", CHARGE_IPI_INTERRUPT: "ipi_interrupt_us"}

#: The hot path stores and compares plain ints (VpState's values): CPython's
#: specialised list-index and compare instructions take exact ints only, and an
#: IntEnum member there cost ~10 % of a run. ``VpState(vp.state)`` names one.
GUEST, EXIT, HYPERCALL, FLUSH, SPINNING, SUSPENDED, HALTED, DESCHEDULED, VF, VTL1 = (int(s) for s in VpState)


class TimeAccount:
    """A VP's state and the time it spent in each (base class of ``vp.VP``).

    ``state_us[s]``: time in state ``s``; guest time is only what is left
    after ``hv_flush_us`` and ``refill_us`` were repaid from it."""

    __slots__ = ("env", "state", "since", "state_us", "hv_flush_us", "refill_us", "hv_debt_us", "refill_debt_us",
                 "tlb", "exit_count", "exit_time")

    def __init__(self, env, tlb, start: int = DESCHEDULED):
        self.env = env
        self.tlb = tlb  # filled by guest time
        self.state = int(start)
        self.since = 0.0
        self.state_us = [0.0] * N_STATES
        self.hv_flush_us = 0.0
        self.refill_us = 0.0
        self.hv_debt_us = 0.0  # hypervisor flush interruptions not yet repaid from guest time
        self.refill_debt_us = 0.0  # TLB refills not yet repaid from guest time
        self.exit_count = [0] * len(EXIT_REASONS)
        self.exit_time = [0.0] * len(EXIT_REASONS)

    def set_state(self, new: VpState, now: float | None = None) -> None:
        """Enter state ``new`` at ``now`` (default: the current time), accounting the old one up to it."""
        if now is None:
            now = self.env.now
        dt = now - self.since
        if dt > 0:
            if self.state == GUEST:
                self.account_guest(dt)
            else:
                self.state_us[self.state] += dt
        self.state = new
        self.since = now

    def advance_guest(self, now: float) -> None:
        """In guest code, account the guest time up to ``now`` without a state change (what a flush
        needs of a running target before it edits the TLB): the one other way than ``set_state`` in
        which time is accounted, so that a timeline can follow both."""
        if self.state == GUEST and now > self.since:
            self.account_guest(now - self.since)
            self.since = now

    def settle(self) -> None:
        """Bring the accounting (and the TLB) up to now without changing state."""
        self.set_state(self.state)

    def account_guest(self, dt: float) -> None:
        """``dt`` of guest time passed: fill the TLB, repay debt, the rest is work."""
        tlb = self.tlb
        if tlb.nonglobal < tlb.nonglobal_cap or tlb.global_entries < tlb.global_cap:
            tlb.advance(dt)
        if not (self.hv_debt_us or self.refill_debt_us):
            self.state_us[GUEST] += dt
            return
        left = dt
        if self.hv_debt_us:
            take = self.hv_debt_us if self.hv_debt_us < left else left
            self.hv_debt_us -= take
            self.hv_flush_us += take
            left -= take
        if self.refill_debt_us and left:
            take = self.refill_debt_us if self.refill_debt_us < left else left
            self.refill_debt_us -= take
            self.refill_us += take
            left -= take
        self.state_us[GUEST] += left

    def switch_at(self, new: VpState, when: float) -> None:
        """Change state as of ``when`` (a moment already past, in a non-guest
        state): the time since ``when`` belongs to ``new``."""
        state_us = self.state_us
        if when >= self.since:
            state_us[self.state] += when - self.since
            self.since = when
        else:  # accounted past ``when`` under the old state (someone settled this VP): move the excess
            state_us[self.state] -= self.since - when
            state_us[new] += self.since - when
        self.state = new

    def record_exit(self, index: int, count: int, time_us: float) -> None:
        self.exit_count[index] += count
        self.exit_time[index] += time_us

    def time_columns(self) -> list[float]:
        """Time per accounting column, in ``TIME_COLUMNS`` order."""
        return [*self.state_us, self.hv_flush_us, self.refill_us]

    def total_us(self) -> float:
        """All accounted time (equals the run's duration once settled)."""
        return sum(self.time_columns())
