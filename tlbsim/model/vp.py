"""A virtual processor: its run loop, interrupts, and time accounting.

The run loop is WHvRunVirtualProcessor's: the VP runs guest code until an
exit (drawn from per-reason rates over guest execution time), the stack
handles the exit, and the VP runs again. Between events nothing is
simulated: TLB filling and the repayment of refill debt are arithmetic on
the length of each guest interval (see ``_account``).

Events a VP costs: one timeout per guest interval and per exit; one
interrupt when it is kicked (IPI, preemption). A flush applied to it by the
hypervisor costs no event at all: it is arithmetic plus debt.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from typing import TYPE_CHECKING

from simpy import Interrupt

from tlbsim.model.tlb import FlushScope, Tlb
from tlbsim.whp import ExitReason

if TYPE_CHECKING:
    from tlbsim.model.partition import Partition

# VP states (exactly one at a time). VF: the guest's VF back-channel work
# (IOCTL completion, OID handler, block reads; see model/vf.py).
GUEST, EXIT, HYPERCALL, FLUSH, SPINNING, SUSPENDED, HALTED, DESCHEDULED, VF = range(9)
STATE_NAMES = ("guest", "exit", "hypercall", "flush", "spinning", "suspended", "halted", "descheduled", "vf")
# Time columns: guest-state time splits into useful work, hypervisor flush
# interruptions and TLB refills.
HV_FLUSH, REFILL = 9, 10
TIME_COLUMNS = (*STATE_NAMES, "hv_flush", "refill")

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


class VP:
    __slots__ = (
        "_exit_cost",
        "_exit_cum",
        "_refill_us",
        "_target_interrupt_us",
        "acc",
        "address_space",
        "applied_ids",
        "arrivals",
        "check",
        "collateral_entries",
        "costs",
        "deferred",
        "deferred_applied",
        "dispatch_event",
        "env",
        "exit_budget_us",
        "exit_count",
        "exit_end_us",
        "exit_gap_mean_us",
        "exit_index",
        "exit_time",
        "flushes_applied",
        "halt_idle_mean_us",
        "host",
        "hv_debt_us",
        "index",
        "inhibit",
        "interruptible",
        "irqs",
        "kicked",
        "next_arrival_us",
        "on_lp",
        "part",
        "preempt_pending",
        "proc",
        "refill_debt_us",
        "refill_entries",
        "requests",
        "since",
        "slice_end_us",
        "state",
        "streams",
        "tlb",
        "vsm",
        "work",
    )

    def __init__(self, part: Partition, index: int, address_space: int, streams, arrivals, vsm_lock):
        cfg = part.config
        self.part = part
        self.env = part.env
        self.host = part.host
        self.index = index
        self.address_space = address_space
        self.streams = streams
        self.arrivals = arrivals
        self.vsm = vsm_lock
        self.costs = cfg.costs
        self._refill_us = cfg.costs.refill_us
        self._target_interrupt_us = cfg.costs.target_interrupt_us
        self.check = cfg.run.check_invariants
        t = cfg.tlb
        self.tlb = Tlb(address_space, t.capacity, t.working_set_pages, t.global_pages, t.fill_rate_per_us, t.start_warm)
        self.inhibit = cfg.locks.memory_access_inhibit

        # Exit mix: cumulative probabilities over EXIT_REASONS by rate.
        specs = part.exit_specs
        total_rate = sum(s.rate_per_ms for s in specs)
        self.exit_gap_mean_us = 1000.0 / total_rate if total_rate > 0 else math.inf
        acc, cum = 0.0, []
        for s in specs:
            acc += s.rate_per_ms
            cum.append(acc / total_rate if total_rate else 0.0)
        self._exit_cum = cum
        self._exit_cost = [s.cost_us for s in specs]
        self.halt_idle_mean_us = cfg.exits.halt_idle_mean_us

        # State and accounting.
        self.state = DESCHEDULED
        self.since = 0.0
        self.acc = [0.0] * len(TIME_COLUMNS)
        self.hv_debt_us = 0.0
        self.refill_debt_us = 0.0
        self.refill_entries = 0.0
        self.collateral_entries = 0.0
        self.flushes_applied = 0
        self.deferred_applied = 0
        self.exit_count = [0] * len(EXIT_REASONS)
        self.exit_time = [0.0] * len(EXIT_REASONS)

        # Scheduling.
        self.on_lp = False
        self.preempt_pending = False
        self.slice_end_us = 0.0
        self.dispatch_event = None

        # Work and interrupts.
        self.irqs: list = []  # (shootdown, scope) IPIs waiting to be taken
        self.deferred: list = []  # (shootdown, scope, whole_context) flushes applied at next entry
        self.requests: deque = deque()
        self.work: deque = deque()  # (cost_us, event): guest work items of the VF chain
        self.interruptible = False
        self.kicked = False
        self.exit_index = -1
        self.exit_end_us = 0.0
        self.applied_ids: set[int] | None = set() if self.check else None

        self.exit_budget_us = streams["exits"].exp(self.exit_gap_mean_us)
        self.next_arrival_us = arrivals.next_time(0.0)
        self.proc = self.env.process(self._run())

    # ------------------------------------------------------------ accounting
    def set_state(self, new: int, now: float | None = None) -> None:
        """Enter state ``new`` at ``now`` (default: the current time), accounting the old one."""
        if now is None:
            now = self.env.now
        dt = now - self.since
        if dt > 0:
            if self.state == GUEST:
                self._account_guest(dt)
            else:
                self.acc[self.state] += dt
        self.state = new
        self.since = now

    def settle(self) -> None:
        """Bring accounting and the TLB up to now without changing state."""
        self.set_state(self.state)

    def _account_guest(self, dt: float) -> None:
        tlb = self.tlb
        if tlb.ng < tlb.ng_cap or tlb.g < tlb.g_cap:
            tlb.advance(dt)
        acc = self.acc
        if not (self.hv_debt_us or self.refill_debt_us):
            acc[GUEST] += dt
            return
        left = dt
        if self.hv_debt_us:
            take = self.hv_debt_us if self.hv_debt_us < left else left
            self.hv_debt_us -= take
            acc[HV_FLUSH] += take
            left -= take
        if self.refill_debt_us and left:
            take = self.refill_debt_us if self.refill_debt_us < left else left
            self.refill_debt_us -= take
            acc[REFILL] += take
            left -= take
        acc[GUEST] += left

    def record_exit(self, index: int, count: int, time_us: float) -> None:
        self.exit_count[index] += count
        self.exit_time[index] += time_us

    # ------------------------------------------------------------ TLB locks
    def locked_until(self, now: float) -> float | None:
        """When this VP's TLB lock lifts, or None if it is not locked."""
        end = None
        if self.inhibit and self.exit_index == I_MEMORY and self.state == EXIT:
            end = self.exit_end_us
        if self.vsm is not None:
            vsm_end = self.vsm.locked_until(now)
            if vsm_end is not None and (end is None or vsm_end > end):
                end = vsm_end
        return end

    def requires(self, scope: FlushScope) -> bool:
        if self.state == GUEST:
            self.settle()
        return self.tlb.required(scope) > 0

    # ------------------------------------------------------------ flushes
    def _remove(self, scope: FlushScope, sd, whole_context: bool) -> None:
        required, removed = self.tlb.flush(scope, whole_context)
        self.refill_debt_us += removed * self._refill_us
        self.refill_entries += required
        self.collateral_entries += removed - required
        self.flushes_applied += 1
        if sd is not None:
            if sd.row < 0:
                sd.refill_entries += required
                sd.collateral_entries += removed - required
            else:  # a deferred flush, applied after its shootdown returned and was recorded
                self.part.recorder.add_refills(sd.row, required, removed - required)
            if self.applied_ids is not None:
                self.applied_ids.add(sd.id)

    def hv_flush(self, scope: FlushScope, sd, whole_context: bool, now: float) -> None:
        """The hypervisor flushes this VP on its LP at ``now``: an interruption
        of ``target_interrupt_us`` plus the refills, both repaid from guest
        time. (The hot path of every hypercall shootdown: _remove, inlined for
        the Space calls' whole-address-space, non-global scope.)"""
        if self.state == GUEST and now > self.since:
            self._account_guest(now - self.since)
            self.since = now
        self.hv_debt_us += self._target_interrupt_us
        if scope.pages is not None or not scope.non_global_only:
            self._remove(scope, sd, whole_context)
            return
        # _remove and Tlb.flush for a Space call's scope, inlined: 0.87 instead of 1.04 us per target
        # (bench.target_flush_us). The shootdown is in its hypercall, not yet recorded: its sums are open.
        tlb = self.tlb
        removed = tlb.ng
        required = removed if scope.address_space is None or scope.address_space == tlb.address_space else 0.0
        if not whole_context:
            removed = required
        tlb.ng -= removed
        self.refill_debt_us += removed * self._refill_us
        self.refill_entries += required
        self.collateral_entries += removed - required
        self.flushes_applied += 1
        sd.refill_entries += required
        sd.collateral_entries += removed - required
        if self.applied_ids is not None:
            self.applied_ids.add(sd.id)

    def defer(self, scope: FlushScope, sd, whole_context: bool) -> None:
        """This VP is not on an LP: flush it before it next runs guest code."""
        self.deferred.append((sd, scope, whole_context))
        sd.deferred_targets += 1

    def local_flush(self, scope: FlushScope, sd) -> None:
        """The guest's own flush (INVLPG / CR3 reload): exact."""
        self._remove(scope, sd, False)

    def _apply_deferred(self) -> None:
        for sd, scope, whole_context in self.deferred:
            self._remove(scope, sd, whole_context)
            self.hv_debt_us += self.costs.deferred_flush_us
            self.deferred_applied += 1
        self.deferred.clear()

    # ------------------------------------------------------------ interrupts
    def kick(self, cancel: bool = False) -> None:
        """Make the VP look at its interrupts / preemption now if it is
        waiting in guest code, spinning or halted."""
        if self.interruptible:
            self.interruptible = False
            if cancel and self.state != HALTED:
                self.kicked = True
            self.proc.interrupt()

    def post_ipi(self, sd, scope: FlushScope) -> None:
        self.irqs.append((sd, scope))
        self.kick(cancel=True)

    def post_work(self, cost_us: float, from_host: bool):
        """Queue ``cost_us`` of guest kernel work (the VF chain's DPCs and
        threads) on this VP; returns the event that fires when it is done.
        It runs when the VP next reaches its run loop on an LP: at once if it
        is in guest code, after waking if halted, and only after the host
        runs it again if descheduled, or after its hypercall if suspended. A
        spinning initiator runs it after its shootdown (it waits for acks at
        raised IRQL, where DPCs and threads do not run). Work started by a
        host message (``from_host``: a VMBus interrupt) kicks a VP out of
        guest code with a Canceled exit; a guest-internal continuation (a
        DPC queuing a work item) does not exit."""
        ev = self.env.event()
        self.work.append((cost_us, ev))
        if self.state != SPINNING:
            self.kick(cancel=from_host)
        return ev

    def _spend(self, state: int, cost_us: float):
        """Spend ``cost_us`` in ``state``: one timeout. If the host kicked the
        VP out of guest code for this, its Canceled exit comes first and
        shares the timeout: nothing is decided between the exit and the work
        that follows, so the time is split between the two states by
        arithmetic (``_switch_at``), not by an event."""
        env = self.env
        if not self.kicked:
            self.set_state(state)
            yield env.timeout(cost_us)
            return
        self.kicked = False
        exit_us = self._exit_cost[I_CANCELED]
        self.record_exit(I_CANCELED, 1, exit_us)
        self.exit_index = I_CANCELED
        self.set_state(EXIT)
        start = env.now
        yield env.timeout(exit_us + cost_us)
        self.exit_index = -1
        self._switch_at(state, start + exit_us)

    def run_work(self):
        """Run the first queued VF work item."""
        cost, ev = self.work.popleft()
        yield from self._spend(VF, cost)
        ev.succeed()

    def take_interrupts(self):
        """Take every pending IPI (a Canceled exit first if the host had to
        kick the VP out of guest code), run the flush handler for each, then
        ack. IPIs that arrive during the round wait for the next one."""
        irqs, self.irqs = self.irqs, []
        yield from self._spend(FLUSH, sum(self.costs.local_flush_cost_us(scope.pages) for _, scope in irqs))
        for sd, scope in irqs:
            self.local_flush(scope, sd)
            sd.ack()

    def _switch_at(self, new: int, when: float) -> None:
        """Change state as of ``when`` (a moment already past, in a non-guest
        state): the time since ``when`` belongs to ``new``."""
        acc = self.acc
        if when >= self.since:
            acc[self.state] += when - self.since
            self.since = when
        else:  # accounted past ``when`` under the old state (someone settled this VP): move the excess
            acc[self.state] -= self.since - when
            acc[new] += self.since - when
        self.state = new

    # ------------------------------------------------------------ LP
    def wait_for_lp(self):
        woken = self.state in (HALTED, SUSPENDED)
        self.set_state(DESCHEDULED)
        ev = self.host.acquire(self, woken)
        if ev is not None:
            yield ev
        if self.deferred:
            self._apply_deferred()

    def give_up_lp(self, state: int) -> None:
        self.set_state(state)
        self.host.release(self)

    def spin_until_acked(self, sd):
        """Busy-wait (interrupts on) until every target acked ``sd``."""
        while sd.pending_acks:
            if not self.on_lp:
                yield from self.wait_for_lp()
            elif self.preempt_pending:
                self.give_up_lp(DESCHEDULED)
            elif self.irqs:
                yield from self.take_interrupts()
            else:
                self.set_state(SPINNING)
                self.interruptible = True
                try:
                    yield sd.acked
                except Interrupt:
                    pass
                self.interruptible = False

    # ------------------------------------------------------------ the loop
    def _run(self):
        env = self.env
        policy = self.part.policy
        exits = self.streams["exits"]
        cum = self._exit_cum
        last = len(cum) - 1
        exit_cost = self._exit_cost
        exit_count = self.exit_count
        exit_time = self.exit_time
        part = self.part
        timeout = env.timeout
        while True:
            if not self.on_lp:
                yield from self.wait_for_lp()
                continue
            if self.preempt_pending:
                self.give_up_lp(DESCHEDULED)
                continue
            if self.irqs:
                yield from self.take_interrupts()
                continue
            if self.work:
                yield from self.run_work()
                continue
            if self.requests:
                yield from policy.shootdown(self, self.requests.popleft())
                continue
            now = env.now
            if self.next_arrival_us <= now:
                self.requests.extend(self.arrivals.requests(self, now))
                self.next_arrival_us = self.arrivals.next_time(now)
                continue
            if self.check:
                assert not self.deferred, f"VP {self.index} runs guest code with a deferred flush pending"
            run_for = self.next_arrival_us - now
            if self.exit_budget_us < run_for:
                run_for = self.exit_budget_us
            self.set_state(GUEST, now)
            self.interruptible = True
            try:
                yield timeout(run_for)
            except Interrupt:
                pass
            self.interruptible = False
            end = env.now
            self.exit_budget_us -= end - now
            if self.exit_budget_us > 1e-9:
                continue
            # The exit (inline: the hot path of every run). Its reason is drawn
            # from the exit mix; the next exit's distance in guest time too.
            self.exit_budget_us = exits.exp(self.exit_gap_mean_us)
            index = bisect_right(cum, exits.uniform())
            if index > last:
                index = last
            cost = exit_cost[index]
            exit_count[index] += 1
            exit_time[index] += cost
            self.exit_index = index
            self.exit_end_us = end + cost
            self.set_state(EXIT, end)
            if index == I_MEMORY:
                part.memory_exits += 1
                yield timeout(cost)
                part.memory_exits -= 1
            else:
                yield timeout(cost)
            self.exit_index = -1
            if index == I_HALT:
                yield from self._halt()

    def _halt(self):
        """HLT: give up the LP and idle until an interrupt or new work."""
        env = self.env
        self.give_up_lp(HALTED)
        if self.irqs or self.requests or self.work:
            return
        idle = self.streams["halt"].exp(self.halt_idle_mean_us)
        wake_at = max(env.now, min(env.now + idle, self.next_arrival_us))
        self.interruptible = True
        try:
            yield env.timeout(wake_at - env.now)
        except Interrupt:
            self.interruptible = False
            yield env.timeout(self.costs.halt_wake_us)  # woken by an IPI
        self.interruptible = False
