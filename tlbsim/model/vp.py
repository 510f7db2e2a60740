"""A virtual processor: its state and its run loop.

Its other jobs are mixins, one module each: the flush verbs and eviction
(vp_flush.FlushTarget), IPIs, VF work and kicks (vp_interrupts.InterruptTarget),
VTL1 and MemoryAccess emulation as TLB-lock holds (vp_locks.LockHolder), the
LP protocol and the sleeps (vp_lp.LpUser); spinning for acks and directed
yields are spin.py's, SimPy internals simpy_compat's. The fields of all of
them are declared here (one slot layout).

The run loop is WHvRunVirtualProcessor's: the VP runs guest code until an
exit (drawn from per-reason rates over guest execution time), the stack
handles the exit, and the VP runs again. Between events nothing is
simulated: TLB filling and the repayment of refill debt are arithmetic on
the length of each guest interval (accounting.TimeAccount, the VP's base
class, owns where the time went; tlb.Tlb owns what a flush removes).

Mechanisms the loop runs besides guest code and exits: VTL1 entries (VSM:
the VP runs no VTL0 code and holds VSM TlbLocked, ``_vtl1``), closed-loop
operations (``workload.mode = "closed"``), TLB eviction by whatever ran on
the LPs while it was away (``_evict``, on dispatch), and spinning that
yields (``spin_until_acked``: pause-loop exits or long spin wait
notifications hand the LP to a preempted VP of the partition).

Flushes reach a VP in one of four ways, one verb each:
``flush_by_hypervisor`` (it is on an LP: interrupted, no event),
``defer_flush`` (it is not: applied by ``apply_deferred_flushes`` when it is
next dispatched), ``flush_locally`` (the guest's own INVLPG / CR3 reload,
also its IPI handler's).

Events a VP costs: one timeout per guest interval and per exit; one
interrupt when it is kicked (preemption, VF work; an IPI's delivery wakes it
with no event of its own: ``wake_for_ipi``). A hypervisor flush costs no
event at all: it is arithmetic plus debt.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from typing import TYPE_CHECKING

from simpy import Interrupt

from tlbsim.model.accounting import (
    CHARGE_COUNTERS,
    DESCHEDULED,
    EXIT,
    FLUSH,
    GUEST,
    HALTED,
    HYPERCALL,
    I_CANCELED,
    I_HALT,
    I_MEMORY,
    I_MSR,
    SPINNING,
    SUSPENDED,
    VF,
    VTL1,
    TimeAccount,
    VpState,
)
from tlbsim.model.spin import SpinYield, spin_until_acked
from tlbsim.model.timing import clock_tolerance
from tlbsim.model.tlb import Tlb
from tlbsim.model.vp_flush import FlushTarget
from tlbsim.model.vp_interrupts import KICK_CANCELED, KICK_IPI, InterruptTarget
from tlbsim.model.vp_locks import LockHolder
from tlbsim.model.vp_lp import LpUser

if TYPE_CHECKING:
    from tlbsim.model.partition import Partition

__all__ = ["VP", "VpState", "GUEST", "EXIT", "HYPERCALL", "FLUSH", "SPINNING", "SUSPENDED", "HALTED",
           "DESCHEDULED", "VF", "VTL1"]




class VP(FlushTarget, InterruptTarget, LockHolder, LpUser, TimeAccount):
    __slots__ = (  # every field of a VP, its mixins' included (one slot layout)
        "_exit_cost", "_exit_cum", "charge", "_refill_us", "address_space", "applied_ids", "closed", "evicted_entries",
        "kernel_fraction", "left_busy_us", "left_lp", "retention_tau_us", "lp", "preempted_in_kernel",
        "spin_exit_us", "spin_window_us", "op_due_us", "part", "preempted", "spin", "spin_epoch",
        "spin_exit_due", "spin_exits", "spin_yields", "vsm", "vtl1_budget_us", "vtl1_end_us", "in_vtl1",
        "emulating", "lock_holder_preemptions", "lock_release", "vlag_us", "vruntime_us", "arrivals",
        "collateral_entries", "costs", "deferred", "deferred_applied", "dispatch_event", "deadline_us",
        "dispatched_us", "exit_budget_us", "exit_gap_mean_us", "exit_index", "flushes_applied",
        "guest_flush_due_us", "_eoi_us", "_eoi_exit", "_ipi_interrupt_us", "_ipi_kick", "eoi_traps",
        "icr_writes", "ipi_interrupt_us", "ipis_received", "pv_ipi_hypercalls", "sched_yield_hypercalls",
        "sched_yield_us", "halt_idle_mean_us", "host", "idle_until_us", "in_shootdown", "index", "inhibit",
        "ipi_send_us", "interruptible", "irqs", "kicked", "next_arrival_us", "on_lp", "policy",
        "preempt_pending", "proc", "recorder", "refill_entries", "requests", "streams", "work",
    )

    def __init__(self, part: Partition, index: int, address_space: int, streams, arrivals, has_thread: bool = True):
        cfg = part.config
        t = cfg.tlb
        super().__init__(part.env, self._build_tlb(index, address_space, t.capacity, t.working_set_pages,
                                                   t.global_pages, t.fill_rate_per_us, t.start_warm))
        self.part = part
        self.host = part.host
        if has_thread:  # a VP that only wakes for interrupts does not make the host overcommitted
            self.host.entities += 1
        self.policy = part.policy
        self.recorder = part.recorder
        self.inhibit = part.intercept_inhibit  # TlbFlushInhibit source, None when that lock is off
        self.index = index
        self.address_space = address_space
        self.streams = streams
        self.arrivals = arrivals
        self.costs = cfg.costs
        self._refill_us = cfg.costs.refill_us
        self._init_exits(part, cfg)
        self._init_flush_counters(cfg)
        self._init_interrupt_delivery(cfg)
        self._init_scheduling(cfg)
        self._init_spin_and_locks(part, index)

        # Work and interrupts.
        self.irqs: list = []  # (shootdown, scope, ack wait) IPIs waiting to be taken
        self.deferred: list = []  # (shootdown, scope, whole_context) flushes applied at next entry
        self.requests: deque = deque()
        self.work: deque = deque()  # (cost_us, event): guest work items of the VF chain
        self.interruptible = False
        self.kicked = 0  # what interrupted guest code is owed by the next _spend (KICK_*)
        self.exit_index = -1
        # (end_us, what, us) of each activity under way whose whole time was counted when it started
        self.charge: tuple = ()
        self.applied_ids: set[int] | None = set() if cfg.run.check_invariants else None

        self.exit_budget_us = streams["exits"].exp(self.exit_gap_mean_us)
        self.closed = arrivals.closed  # closed loop: the next shootdown after op_due_us of guest work
        self.op_due_us = arrivals.work_us() if self.closed else math.inf
        self.next_arrival_us = arrivals.next_time()
        # guest load: a VP with no thread idles (halted) for ever but for interrupts; a thread that
        # sleeps after its operation idles its VP until then (``_idle``)
        self.idle_until_us = 0.0 if has_thread else math.inf
        self.proc = self.env.process(self._run())

    def _build_tlb(self, index: int, address_space: int, capacity: int, working_set: int, global_pages: int,
                   fill_rate_per_us: float, warm: bool) -> Tlb:
        """Its TLB (vp_arrays.array_vp_class: one whose occupancy lives in the partition's arrays)."""
        return Tlb(address_space, capacity, working_set, global_pages, fill_rate_per_us, warm)

    def _init_exits(self, part: Partition, cfg) -> None:
        """The exit mix: cumulative probabilities over EXIT_REASONS by rate, and each one's cost."""
        specs = part.exit_specs
        total_rate = sum(s.rate_per_ms for s in specs)
        self.exit_gap_mean_us = 1000.0 / total_rate if total_rate > 0 else math.inf
        running, cum = 0.0, []
        for s in specs:
            running += s.rate_per_ms
            cum.append(running / total_rate if total_rate else 0.0)
        self._exit_cum = cum
        self._exit_cost = [s.cost_us for s in specs]
        self.halt_idle_mean_us = cfg.exits.halt_idle_mean_us

    def _init_flush_counters(self, cfg) -> None:
        """Flush bookkeeping (per-VP columns of the vps table) and TLB eviction while away."""
        self.refill_entries = 0.0
        self.collateral_entries = 0.0
        self.evicted_entries = 0.0
        self.flushes_applied = 0
        self.guest_flush_due_us = 0.0  # lazy-TLB flushes the guest owes before it runs guest code again
        self.deferred_applied = 0
        self.ipi_send_us = 0.0  # in exits sending IPIs (trapped ICR writes or PV send-IPI hypercalls)
        # eviction while away (docs/model.md "TLB contents across descheduling"): what ran on the LP
        t = cfg.tlb
        tau = t.retention_tau_us or (t.capacity / t.fill_rate_per_us if t.fill_rate_per_us else math.inf)
        self.retention_tau_us = tau
        self.left_lp = None  # the LP it left last (None: it has not run yet)
        self.left_busy_us = 0.0  # that LP's busy time when it left (Host._put_prev)

    def _init_interrupt_delivery(self, cfg) -> None:
        """How IPIs reach this VP and what its EOIs cost, with their counters."""
        # Interrupt delivery (docs/model.md "Interrupt delivery"): with the APIC in the hypervisor, an IPI
        # interrupts a running target without an exit to the stack (and without any exit with posted
        # interrupts), and its EOI traps unless posted interrupts virtualize it; with a user-mode APIC
        # the stack cancels the target's run (a Canceled exit) and sees every ICR write.
        user_apic = cfg.partition.apic_emulation == "user"
        posted = cfg.costs.posted_interrupts
        self._ipi_kick = KICK_CANCELED if user_apic else (0 if posted else KICK_IPI)
        self._ipi_interrupt_us = cfg.costs.target_interrupt_us
        # an EOI: with posted interrupts virtualized (no exit); else a trap to the hypervisor, or with a
        # user-mode x2APIC an X64MsrAccess exit to the stack (its cost; set below, with the exit mix)
        self._eoi_us = 0.0 if posted else (self._exit_cost[I_MSR] if user_apic else cfg.costs.vmexit_roundtrip_us)
        self._eoi_exit = user_apic
        self.icr_writes = 0  # trapped ICR writes the hypervisor handled (not exits to the stack)
        self.pv_ipi_hypercalls = 0  # KVM PV send-IPI hypercalls (handled in the hypervisor)
        self.sched_yield_hypercalls = 0  # KVM_HC_SCHED_YIELD
        self.sched_yield_us = 0.0  # ... and their time (in the exit state)
        self.ipis_received = 0
        self.eoi_traps = 0
        self.ipi_interrupt_us = 0.0  # the hypervisor's interruptions of guest code to deliver IPIs

    def _init_scheduling(self, cfg) -> None:
        """What the host and KVM's spin logic read and write about this VP."""
        self.on_lp = False
        self.preempt_pending = False
        self.preempted = False  # descheduled while runnable (KVM's steal-time "preempted")
        self.preempted_in_kernel = False  # ... in guest kernel mode (kvm_arch_vcpu_preempted_in_kernel)
        self.in_shootdown = False  # in a shootdown of its own (kernel mode, whatever its state)
        self.kernel_fraction = cfg.guest.kernel_fraction
        self.lp = None  # the LP it last ran on
        self.deadline_us = 0.0  # EEVDF's virtual deadline
        self.vlag_us = 0.0  # EEVDF's lag, kept across a sleep
        self.dispatch_event = None
        self.vruntime_us = 0.0  # LP time had (the host's fair queue order)
        self.dispatched_us = 0.0

    def _init_spin_and_locks(self, part: Partition, index: int) -> None:
        """Spinning that yields (None: spin until acked or preempted) and TLB-lock holding (VTL1,
        MemoryAccess emulation)."""
        self.spin: SpinYield | None = part.spin_yield
        self.spin_window_us = self.spin.base_window_us if self.spin is not None else 0.0  # vmx->ple_window
        self.spin_exit_us = 0.0  # in pause-loop exits / long spin wait notifications
        self.spin_epoch = 0
        self.spin_exit_due = False
        self.spin_exits = 0
        self.spin_yields = 0

        # VTL1 (VSM): entries per guest time; None when this VP has no VTL1.
        self.vsm = part.vsm_for(index)
        self.vtl1_budget_us = self.vsm.next_gap_us() if self.vsm is not None else math.inf
        self.vtl1_end_us = 0.0
        self.in_vtl1 = False  # holds VSM TlbLocked (in VTL1, on an LP or preempted)
        self.emulating = False  # holds TlbFlushInhibit (its MemoryAccess exit is being emulated)
        self.lock_holder_preemptions = 0  # preempted by the host while holding a TLB lock
        self.lock_release = None  # fires when it releases its TLB lock, if a caller waits for that

    # ------------------------------------------------------------ accounting
    def clock(self) -> list[float]:
        """Time so far in each state (guest time with what it repaid, the current state up to now),
        then the IPI send, PV sched-yield, spin-exit and kick totals: a shootdown's latency anatomy is the
        change of its initiator's clock (ShootdownRecorder._anatomy)."""
        c = list(self.state_us)  # a copy (an array-backed VP's row is a memoryview)
        c[GUEST] += self.hv_flush_us + self.refill_us
        c[self.state] += self.env.now - self.since
        c += (self.ipi_send_us, self.sched_yield_us, self.spin_exit_us,
              self.ipi_interrupt_us + self.exit_time[I_CANCELED])  # kicks before handlers and VF work
        return c


    def trim_charges(self, end_us: float) -> None:
        """The run ended at ``end_us``: what an activity still under way had counted beyond it (its
        exit's time, its IPI send, its spin exit) is taken back, so no count holds time beyond the run."""
        for until_us, what, us in self.charge:
            excess = until_us - end_us
            if excess <= 0.0:
                continue
            excess = min(excess, us)
            if what in CHARGE_COUNTERS:
                name = CHARGE_COUNTERS[what]
                setattr(self, name, getattr(self, name) - excess)
            else:
                self.exit_time[what] -= excess
        self.charge = ()

    def spin_until_acked(self, acks):
        """Busy-wait until every target acked (spin.py)."""
        return spin_until_acked(self, acks)

    # ------------------------------------------------------------ the loop
    def _run(self):
        env = self.env
        policy = self.policy
        arrivals = self.arrivals
        exits = self.streams["exits"]
        cum = self._exit_cum
        last = len(cum) - 1
        exit_cost = self._exit_cost
        exit_count = self.exit_count
        exit_time = self.exit_time
        inhibit = self.inhibit
        timeout = env.timeout
        check = self.applied_ids is not None
        closed = self.closed
        state_us = self.state_us
        while True:
            if not self.on_lp:
                yield from self.wait_for_lp()
                continue
            if self.preempt_pending:
                self.give_up_lp_preempted()
                continue
            if self.irqs:
                yield from self.take_interrupts()
                continue
            if self.work:
                yield from self.run_work()
                continue
            if self.guest_flush_due_us:  # back from lazy TLB: the guest's own flush (switch_mm)
                cost, self.guest_flush_due_us = self.guest_flush_due_us, 0.0
                yield from self._spend(FLUSH, cost)
                continue
            if self.requests:
                self.in_shootdown = True
                yield from policy.shootdown(self, self.requests.popleft())
                self.in_shootdown = False
                if not self.requests and arrivals.sleep_mean_us:  # the thread sleeps after its operation
                    self.idle_until_us = env.now + arrivals.sleep_us()
                continue
            now = env.now
            if self.idle_until_us > now:  # no runnable thread: HLT until then or an interrupt
                yield from self._idle()
                continue
            if self.next_arrival_us <= now:  # open loop: every arrival up to now, with its own time
                self.requests.extend(arrivals.requests(self, now))
                self.next_arrival_us = arrivals.next_time()
                continue
            if check:
                assert not self.deferred, f"VP {self.index} runs guest code with a deferred flush pending"
            self.set_state(GUEST, now)
            if closed:  # the next operation is due after op_due_us of useful guest work
                left = self.op_due_us - state_us[GUEST]
                if left <= clock_tolerance(now):
                    self.requests.extend(arrivals.requests(self, now))
                    self.op_due_us = state_us[GUEST] + arrivals.work_us()
                    continue
                run_for = left + self.hv_debt_us + self.refill_debt_us  # debts are repaid first
            else:
                run_for = self.next_arrival_us - now
            if self.exit_budget_us < run_for:
                run_for = self.exit_budget_us
            if self.vtl1_budget_us < run_for:
                run_for = self.vtl1_budget_us
            self.interruptible = True
            try:
                yield timeout(run_for)
            except Interrupt:
                pass
            self.interruptible = False
            end = env.now
            self.exit_budget_us -= end - now
            tolerance = clock_tolerance(end)
            if self.vsm is not None:
                self.vtl1_budget_us -= end - now
                if self.vtl1_budget_us <= tolerance:
                    yield from self._vtl1(end)
                    continue
            if self.exit_budget_us > tolerance:
                continue
            # The exit (inline: the hot path of every run; record_exit's work
            # done in place). Its reason is drawn from the exit mix; the next
            # exit's distance in guest time too.
            self.exit_budget_us = exits.exp(self.exit_gap_mean_us)
            index = bisect_right(cum, exits.uniform())
            if index > last:
                index = last
            cost = exit_cost[index]
            exit_count[index] += 1
            exit_time[index] += cost
            self.charge = ((end + cost, index, cost),)
            self.exit_index = index
            self.set_state(EXIT, end)
            if index == I_MEMORY and inhibit is not None:  # TlbFlushInhibit while the stack emulates
                yield from self._emulate(end, cost)
            else:
                yield timeout(cost)
            self.exit_index = -1
            if index == I_HALT:
                yield from self._halt()
