"""A virtual processor: its run loop and interrupts.

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
from functools import partial
from typing import TYPE_CHECKING

from simpy import Interrupt
from simpy.events import Event

from tlbsim.hv import GVA_RANGE_MAX_PAGES
from tlbsim.model.accounting import (
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
from tlbsim.model.host import YIELD_FAILED, YIELD_LEFT_LP
from tlbsim.model.spin import SpinYield, spin_until_acked
from tlbsim.model.tlb import EVERYTHING, FlushScope, Tlb

if TYPE_CHECKING:
    from tlbsim.model.partition import Partition

__all__ = ["VP", "VpState", "GUEST", "EXIT", "HYPERCALL", "FLUSH", "SPINNING", "SUSPENDED", "HALTED",
           "DESCHEDULED", "VF", "VTL1"]


#: What kicked a VP out of guest code (VP.kicked): the stack's Canceled exit, or the hypervisor's
#: interruption to deliver an IPI (no exit to the stack).
KICK_CANCELED, KICK_IPI = 1, 2


def clock_tolerance(now_us: float) -> float:
    """What is left of a time budget below this is rounding, not time: an
    absolute nanosecond-scale floor plus a few ulps of the clock (at 2^24 us
    and beyond, a float clock cannot advance by 1e-9 us any more)."""
    return 1e-9 + now_us * 1e-15


def flush_pages_by_hypervisor(targets, scope: FlushScope, whole_context: bool, shootdown, now: float,
                              debt_us: float, refill_us: float, record_ids: bool,
                              defer_idle: bool = True) -> tuple[list[float], int]:
    """The hypervisor flushes a page scope (``scope.pages`` is set) on every target at ``now``: each
    target on an LP as ``VP.flush_by_hypervisor`` does it (a List call's scope, ``debt_us`` of
    interruption and flush work owed by each), each other one deferred (``VP.defer_flush``), or, with
    ``defer_idle`` False (a hardware broadcast reaches every LP), flushed now at no cost to it. Returns
    the entries each running target's flush required, in target order (page flushes are exact: removed
    = required, no collateral), and how many targets were deferred, for the caller to report
    (``ShootdownRecorder.running_flushed_pages`` and ``deferred``).

    The one fast path of the hottest loop of a large partition (a 1-page List call to 4,095
    running targets, every shootdown of the default guest): the same arithmetic in the same
    order as ``flush_by_hypervisor`` with ``Tlb.flush_pages`` (tests/test_model.py checks the
    results bit for bit), inline, without two calls and a tuple per target (calling a Tlb method for
    the page arithmetic instead cost 14 % a target at 16 VPs, measured alternating in one process;
    guest accounting stays a call: inlining it too saved only 3-4 %). Collateral entries
    are left alone: adding ``removed - required`` (+0.0) to a sum that starts at 0.0 and never
    falls below it changes no bit (the VP's ``collateral_entries`` and the row's alike). ``refill_us``
    and ``record_ids`` (the invariant checks are on: every VP keeps ``applied_ids``) are passed, not
    read per target: 8-11 % of a target's cost, measured alternating in one process."""
    address_space, pages = scope.address_space, scope.pages
    required_list = []
    append = required_list.append
    deferred = 0
    for t in targets:
        if not t.on_lp:
            if defer_idle:  # VP.defer_flush, inline; the caller reports the count
                t.deferred.append((shootdown, scope, whole_context))
                deferred += 1
            else:  # VP.flush_now_idle
                t._book(shootdown, *t.tlb.flush_pages(address_space, pages))
            continue
        t.advance_guest(now)
        tlb = t.tlb
        t.hv_debt_us += debt_us
        working_set = tlb.working_set
        if (address_space is not None and address_space != tlb.address_space) or not working_set:
            required = 0.0
        else:
            nonglobal = tlb.nonglobal
            required = pages * nonglobal / working_set
            if required > nonglobal:
                required = nonglobal
            tlb.nonglobal = nonglobal - required
        t.refill_debt_us += required * refill_us
        t.refill_entries += required
        t.flushes_applied += 1
        if record_ids:
            t.applied_ids.add(shootdown.id)
        append(required)
    return required_list, deferred


class _IpiInterrupt(Event):
    """An event already processed and failed with ``simpy.Interrupt``: what a woken VP's process is
    resumed with (as by SimPy's own Interruption event)."""

    def __init__(self, env):
        self.env = env
        self.callbacks = None
        self._value = Interrupt(None)
        self._ok = False
        self._defused = True


def wake_for_ipi(vp) -> None:
    """Resume ``vp``'s process with ``simpy.Interrupt`` now, from the callback of the event that
    delivered its IPI, instead of scheduling an Interruption for the same instant: one SimPy event
    fewer per IPI target, and the same order of everything else. That order argument: the delivery
    is a NORMAL event at time t, so no URGENT event of time t is pending when it is processed, and
    the Interruption (URGENT, t) ``Process.interrupt`` would schedule is the very next event
    processed; resuming here is resuming at that same point (``guest._deliver_all`` posts every
    target's IPI first, then wakes them in target order, as their Interruptions would have run).
    Only from an event's callback, never from inside a process step.

    The lines mirror ``simpy.events.Interruption._interrupt`` (SimPy 4: the process's ``_target``
    and ``_resume``); tests/test_mechanisms.py checks IPI shootdowns against the Interruption path."""
    proc = vp.proc
    proc._target.callbacks.remove(proc._resume)
    proc._resume(_IpiInterrupt(vp.env))


class VP(TimeAccount):
    __slots__ = (
        "_exit_cost",
        "_exit_cum",
        "_refill_us",
        "address_space",
        "applied_ids",
        "closed",
        "evicted_entries",
        "kernel_fraction",
        "left_busy_us",
        "left_lp",
        "retention_tau_us",
        "lp",
        "preempted_in_kernel",
        "spin_exit_us",
        "spin_window_us",
        "op_due_us",
        "part",
        "preempted",
        "spin",
        "spin_epoch",
        "spin_exit_due",
        "spin_exits",
        "spin_yields",
        "vsm",
        "vtl1_budget_us",
        "vtl1_end_us",
        "in_vtl1",
        "emulating",
        "lock_holder_preemptions",
        "lock_release",
        "vlag_us",
        "vruntime_us",
        "arrivals",
        "collateral_entries",
        "costs",
        "deferred",
        "deferred_applied",
        "dispatch_event",
        "deadline_us",
        "dispatched_us",
        "exit_budget_us",
        "exit_gap_mean_us",
        "exit_index",
        "flushes_applied",
        "guest_flush_due_us",
        "_eoi_us",
        "_eoi_exit",
        "_ipi_interrupt_us",
        "_ipi_kick",
        "eoi_traps",
        "icr_writes",
        "ipi_interrupt_us",
        "ipis_received",
        "pv_ipi_hypercalls",
        "sched_yield_hypercalls",
        "sched_yield_us",
        "halt_idle_mean_us",
        "host",
        "idle_until_us",
        "in_shootdown",
        "index",
        "inhibit",
        "ipi_send_us",
        "interruptible",
        "irqs",
        "kicked",
        "next_arrival_us",
        "on_lp",
        "policy",
        "preempt_pending",
        "proc",
        "recorder",
        "refill_entries",
        "requests",
        "streams",
        "work",
    )

    def __init__(self, part: Partition, index: int, address_space: int, streams, arrivals, has_thread: bool = True):
        cfg = part.config
        t = cfg.tlb
        super().__init__(part.env, Tlb(address_space, t.capacity, t.working_set_pages, t.global_pages,
                                       t.fill_rate_per_us, t.start_warm))
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

        # Exit mix: cumulative probabilities over EXIT_REASONS by rate.
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

        # Flush bookkeeping (per-VP columns of the vps table).
        self.refill_entries = 0.0
        self.collateral_entries = 0.0
        self.evicted_entries = 0.0
        self.flushes_applied = 0
        self.guest_flush_due_us = 0.0  # lazy-TLB flushes the guest owes before it runs guest code again
        self.deferred_applied = 0
        self.ipi_send_us = 0.0  # in exits sending IPIs (trapped ICR writes or PV send-IPI hypercalls)
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
        # eviction while away (docs/model.md "TLB contents across descheduling"): what ran on the LP
        tau = t.retention_tau_us or (t.capacity / t.fill_rate_per_us if t.fill_rate_per_us else math.inf)
        self.retention_tau_us = tau
        self.left_lp = None  # the LP it left last (None: it has not run yet)
        self.left_busy_us = 0.0  # that LP's busy time when it left (Host._put_prev)

        # Scheduling.
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

        # Spinning that yields (None: spin until acked or preempted).
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

        # Work and interrupts.
        self.irqs: list = []  # (shootdown, scope, ack wait) IPIs waiting to be taken
        self.deferred: list = []  # (shootdown, scope, whole_context) flushes applied at next entry
        self.requests: deque = deque()
        self.work: deque = deque()  # (cost_us, event): guest work items of the VF chain
        self.interruptible = False
        self.kicked = 0  # what interrupted guest code is owed by the next _spend (KICK_*)
        self.exit_index = -1
        self.applied_ids: set[int] | None = set() if cfg.run.check_invariants else None

        self.exit_budget_us = streams["exits"].exp(self.exit_gap_mean_us)
        self.closed = arrivals.closed  # closed loop: the next shootdown after op_due_us of guest work
        self.op_due_us = arrivals.work_us() if self.closed else math.inf
        self.next_arrival_us = arrivals.next_time()
        # guest load: a VP with no thread idles (halted) for ever but for interrupts; a thread that
        # sleeps after its operation idles its VP until then (``_idle``)
        self.idle_until_us = 0.0 if has_thread else math.inf
        self.proc = self.env.process(self._run())

    # ------------------------------------------------------------ flushes
    def requires(self, scope: FlushScope) -> bool:
        """Does this VP's TLB hold anything ``scope`` must remove (TLFS: "requires a flush")? Drawn
        from its occupancy (``Tlb.require_probability``) on its own stream: the expected count of
        cached entries is positive for any warm TLB, so asking it instead made every lock holder
        block every call."""
        if self.state == GUEST:
            self.settle()
        p = self.tlb.require_probability(scope)
        return p >= 1.0 or (p > 0.0 and self.streams["tlbcheck"].uniform() < p)

    def flush_now_idle(self, scope: FlushScope, shootdown, whole_context: bool) -> None:
        """A hardware broadcast (INVLPGB) flushed this VP's entries on every LP while it was not
        running: applied now, at no cost to it but the refills."""
        required, removed = self.tlb.flush(scope, whole_context)
        self._book(shootdown, required, removed)

    def _book(self, shootdown, required: float, removed: float) -> None:
        """Refills owed for ``removed`` entries; the flush reported to the recorder."""
        self.refill_debt_us += removed * self._refill_us
        self.refill_entries += required
        self.collateral_entries += removed - required
        self.flushes_applied += 1
        if shootdown is not None:
            self.recorder.flushed(shootdown, required, removed)
            if self.applied_ids is not None:
                self.applied_ids.add(shootdown.id)

    def flush_by_hypervisor(self, scope: FlushScope, shootdown, whole_context: bool, now: float, debt_us: float):
        """The hypervisor flushes this VP on its LP at ``now``: ``debt_us`` of
        interruption and flush work (0 under a hardware broadcast) plus the
        refills, both repaid from guest time. Returns (required, removed) for the hypervisor to report to the
        recorder (``ShootdownRecorder.running_flushed``, one call for all
        running targets).

        Once per running target of every Space call (List calls go through
        ``flush_pages_by_hypervisor``, the batched form of this with the page
        scope): a Space call's scope takes the TLB's address-space fast path,
        and ``_book``'s VP half is done in place (with ``recorder.flushed`` per
        target, this path measured 0.61 instead of 0.51 us per target)."""
        self.advance_guest(now)
        self.hv_debt_us += debt_us
        pages = scope.pages
        if pages is not None:
            flushed = self.tlb.flush_pages(scope.address_space, pages)
        elif scope.non_global_only:
            flushed = self.tlb.flush_space_nonglobal(scope.address_space, whole_context)
        else:
            flushed = self.tlb.flush(scope, whole_context)
        required, removed = flushed
        self.refill_debt_us += removed * self._refill_us
        self.refill_entries += required
        self.collateral_entries += removed - required
        self.flushes_applied += 1
        if self.applied_ids is not None:
            self.applied_ids.add(shootdown.id)
        return flushed

    def clock(self) -> list[float]:
        """Time so far in each state (guest time with what it repaid, the current state up to now),
        then the IPI send, PV sched-yield and spin-exit totals: a shootdown's latency anatomy is the
        change of its initiator's clock (ShootdownRecorder._anatomy)."""
        c = self.state_us[:]
        c[GUEST] += self.hv_flush_us + self.refill_us
        c[self.state] += self.env.now - self.since
        c += (self.ipi_send_us, self.sched_yield_us, self.spin_exit_us)
        return c

    def defer_flush(self, scope: FlushScope, shootdown, whole_context: bool) -> None:
        """This VP is not on an LP: flush it before it next runs guest code."""
        self.deferred.append((shootdown, scope, whole_context))
        self.recorder.deferred(shootdown)

    def flush_locally(self, scope: FlushScope, shootdown) -> None:
        """The guest's own flush (INVLPG / CR3 reload): exact."""
        required, removed = self.tlb.flush(scope, False)
        self._book(shootdown, required, removed)

    def apply_deferred_flushes(self) -> None:
        """Flushes deferred while this VP was off its LP, applied before it
        runs guest code. Under a profile with a flush queue (KVM), more
        queued page-range flushes than the queue holds become one flush of
        everything (charged to the first)."""
        deferred = self.deferred
        limit = self.part.profile.flush_queue_ranges
        overflow = False
        if limit:  # KVM: the FIFO's entries are GVA ranges; one slot is kept for "flush everything"
            ranges = sum(-(-scope.pages // GVA_RANGE_MAX_PAGES) for _, scope, w in deferred
                         if scope.pages is not None and w is not None)
            if ranges > limit - 1:  # KVM_HV_TLB_FLUSH_FIFO_SIZE 16: more than 15 ranges
                overflow = True
                deferred = [(sd, scope, w) if w is None else (sd, EVERYTHING, True) for sd, scope, w in deferred]
        charged = False
        for shootdown, scope, whole_context in deferred:
            required, removed = self.tlb.flush(scope, bool(whole_context))
            self._book(shootdown, required, removed)
            if whole_context is None:  # the guest's own (lazy TLB): its flush when it runs again
                self.guest_flush_due_us += self.costs.local_flush_cost_us(scope.pages)
            elif not (overflow and charged):  # an overflow is one flush of everything: charged once
                self.hv_debt_us += self.costs.deferred_flush_us
                charged = True
            self.deferred_applied += 1
        self.deferred.clear()

    def _evict(self) -> None:
        """Dispatched again: back on the LP it left, it keeps exp(-t / tau) of its TLB, t the time
        other entities ran on that LP meanwhile (their working sets evicted the rest); on another LP
        it keeps nothing (its entries are on the one it left). The rest are refills."""
        lp = self.lp
        if lp == self.left_lp:
            foreign = self.host.lp_busy_us[lp] - self.left_busy_us
            if foreign <= 0.0:
                return
            retained = math.exp(-foreign / self.retention_tau_us)
        else:
            retained = 0.0
        gone = self.tlb.evict(retained)
        self.evicted_entries += gone
        self.refill_debt_us += gone * self._refill_us

    # ------------------------------------------------------------ interrupts
    def _claim_wake(self, kick: int) -> bool:
        """True when the VP waits interruptibly (guest code, a spin, HLT) and the caller must wake
        it; it stops being interruptible, and a VP out of HLT owes what the ``kick`` costs it
        (KICK_CANCELED: the stack's Canceled exit; KICK_IPI: the hypervisor's interruption to
        deliver an IPI; 0: nothing)."""
        if not self.interruptible:
            return False
        self.interruptible = False
        if kick and self.state != HALTED:
            self.kicked = kick
        return True

    def kick(self, cancel: bool = False) -> None:
        """Make the VP look at its interrupts / preemption now if it is
        waiting in guest code, spinning or halted; with ``cancel`` the
        virtualization stack cancels its run (a Canceled exit)."""
        if self._claim_wake(KICK_CANCELED if cancel else 0):
            self.proc.interrupt()

    def post_ipi(self, shootdown, scope: FlushScope, acks) -> bool:
        """An IPI arrives: queued for ``take_interrupts``. Returns True when the VP was waiting
        interruptibly (guest code, a spin, HLT) and the deliverer must wake it (``wake_for_ipi``,
        after posting every IPI the delivery carries), without an Interruption event. A running
        VP is interrupted by the hypervisor (no exit to the stack; none at all with posted
        interrupts), or, with a user-mode APIC, kicked out with a Canceled exit."""
        self.irqs.append((shootdown, scope, acks))
        return self._claim_wake(self._ipi_kick)

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

    def _spend(self, state: VpState, cost_us: float):
        """Spend ``cost_us`` in ``state``: one timeout. If the VP was kicked out
        of guest code for this, the exit comes first and shares the timeout (a
        Canceled exit to the stack, or the hypervisor's interruption for an
        IPI): nothing is decided between the exit and the work that follows,
        so the time is split between the two states by arithmetic
        (``switch_at``), not by an event."""
        env = self.env
        kick = self.kicked
        exit_us = self._kick_us(kick) if kick else 0.0
        self.kicked = 0
        if not exit_us:
            self.set_state(state)
            yield env.timeout(cost_us)
            return
        if kick == KICK_CANCELED:
            self.record_exit(I_CANCELED, 1, exit_us)
            self.exit_index = I_CANCELED
        else:  # the hypervisor's own: not an exit to the stack
            self.ipi_interrupt_us += exit_us
        self.set_state(EXIT)
        start = env.now
        yield env.timeout(exit_us + cost_us)
        self.exit_index = -1
        self.switch_at(state, start + exit_us)

    def _kick_us(self, kick: int) -> float:
        return self._exit_cost[I_CANCELED] if kick == KICK_CANCELED else self._ipi_interrupt_us

    def _spend_us(self, cost_us: float) -> float:
        """How long ``_spend(state, cost_us)`` takes from now (its one timeout)."""
        return self._kick_us(self.kicked) + cost_us if self.kicked else cost_us

    def run_work(self):
        """Run the first queued VF work item."""
        cost, ev = self.work.popleft()
        yield from self._spend(VF, cost)
        ev.succeed()

    def take_interrupts(self):
        """Take every pending IPI (after the exit that interrupted guest code,
        ``_spend``), run the flush handler for each (with its EOI: a trap to the
        hypervisor without posted interrupts and an in-hypervisor APIC), then
        ack. IPIs that arrive during the round wait for the next one."""
        irqs, self.irqs = self.irqs, []
        cost = sum(self.costs.local_flush_cost_us(scope.pages) for _, scope, _ in irqs)
        self.ipis_received += len(irqs)
        if self._eoi_us:  # no virtual-interrupt delivery: each handler's EOI write traps (its time: flush_us)
            if self._eoi_exit:  # a user-mode x2APIC: an X64MsrAccess exit to the stack
                self.record_exit(I_MSR, len(irqs), self._eoi_us * len(irqs))
            else:
                self.eoi_traps += len(irqs)
            cost += self._eoi_us * len(irqs)
        end = self.env.now + self._spend_us(cost)  # when the handler's timeout ends: the acks are due then
        for _, _, acks in irqs:
            acks.handler_ends_at(end)
        yield from self._spend(FLUSH, cost)
        if self.applied_ids is not None:  # run.check_invariants
            assert self.env.now == end, f"VP {self.index}'s handler ended at {self.env.now}, its acks were due at {end}"
        for shootdown, scope, acks in irqs:
            self.flush_locally(scope, shootdown)
            acks.ack()

    # ------------------------------------------------------------ LP
    def wait_for_lp(self):
        woken = self.state in (HALTED, SUSPENDED)  # out of a sleep: placed as a sleeper, may preempt
        self.set_state(DESCHEDULED)
        host = self.host
        ev = host.acquire(self, woken)
        if ev is not None:
            yield ev
        self.preempted = False
        if self.spin is not None:  # shrink_ple_window at sched-in (ple_window_shrink 0: back to the base)
            self.spin_window_us = self.spin.base_window_us
        if self.left_lp is not None and self.retention_tau_us < math.inf:
            self._evict()
        self.left_lp = self.lp
        if self.deferred:
            self.apply_deferred_flushes()

    def give_up_lp(self, state: int) -> None:
        """Leave the LP to sleep (HALTED, SUSPENDED): not preempted (kvm_sched_out of a task
        that is not runnable)."""
        self.set_state(state)
        self.kicked = 0  # an exit that led to losing the LP is part of that switch
        self.preempted = False
        self.host.release(self)

    def descheduled_runnable(self) -> None:
        """Off the LP while runnable (kvm_sched_out: vcpu->preempted, with the guest's mode then:
        kernel in a flush, spin, handler or hypercall; in guest code, kernel with probability
        guest.kernel_fraction)."""
        in_kernel = (self.in_shootdown or self.state != GUEST and self.state != EXIT
                     or self.streams["sched"].uniform() < self.kernel_fraction)
        self.set_state(DESCHEDULED)
        self.kicked = 0  # an exit that led to losing the LP is part of that switch
        self.preempted = True
        self.preempted_in_kernel = in_kernel

    def give_up_lp_preempted(self) -> None:
        """The host preempts this VP (end of slice, wakeup preemption): back to the run queue."""
        self.descheduled_runnable()
        self.host.release(self)

    def yield_lp_to(self, target) -> int:
        """A directed yield to ``target``: Host.yield_to's outcome (host.YIELD_*). On YIELD_LEFT_LP
        this VP must wait for an LP again."""
        outcome = self.host.yield_to(self, target)
        if outcome != YIELD_FAILED:
            self.part.last_boosted = target.index
            if outcome == YIELD_LEFT_LP:
                self.spin_yields += 1
        return outcome

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
            self.exit_index = index
            self.set_state(EXIT, end)
            if index == I_MEMORY and inhibit is not None:  # TlbFlushInhibit while the stack emulates
                yield from self._emulate(end, cost)
            else:
                yield timeout(cost)
            self.exit_index = -1
            if index == I_HALT:
                yield from self._halt()

    def _vtl1(self, now: float):
        """A VTL1 entry (VSM): the VP runs the secure kernel for a hold,
        takes no VTL0 interrupts (IPIs wait in ``irqs``) and holds VSM
        TlbLocked until it returns (locks.VsmTlbLocks); the host may preempt
        it meanwhile (``_hold_lock``)."""
        self.in_vtl1 = True
        self.set_state(VTL1, now)
        yield from self._hold_lock(self.vsm.hold_us(), VTL1, -1, self._publish_vtl1_end)
        self.in_vtl1 = False
        self.vtl1_end_us = self.env.now
        self._released()
        self.vtl1_budget_us = self.vsm.next_gap_us()

    def _publish_vtl1_end(self, end_us: float) -> None:
        self.vtl1_end_us = end_us

    def _emulate(self, now: float, cost_us: float):
        """The stack emulates a MemoryAccess exit for ``cost_us``, holding TlbFlushInhibit
        (locks.InterceptInhibit); the host may preempt the VP meanwhile (``_hold_lock``). An IPI
        arriving meanwhile waits for the exit to end, as before (it interrupts nothing)."""
        inhibit = self.inhibit
        self.emulating = True
        yield from self._hold_lock(cost_us, EXIT, I_MEMORY, partial(inhibit.begin, self.index))
        inhibit.end(self.index)
        self.emulating = False
        self._released()

    def _hold_lock(self, left_us: float, state: int, exit_index: int, publish_end):
        """Spend ``left_us`` on the LP in ``state`` holding a TLB lock, telling ``publish_end`` when
        the lock will lift. The host may preempt the VP meanwhile (its slice ends, a wakeup preempts
        it: lock-holder preemption): the lock stays held with no known end (inf) while the VP waits
        for an LP, and the rest of the hold runs when it is back. Callers suspended on it wake on its
        release (``lock_release_event``). Interrupts that arrive meanwhile wait: the VP is not in
        VTL0 guest code, so nothing is delivered."""
        env = self.env
        while True:
            start = env.now
            publish_end(start + left_us)
            self.interruptible = True
            try:
                yield env.timeout(left_us)
            except Interrupt:
                pass
            self.interruptible = False
            self.kicked = 0
            left_us -= env.now - start
            if left_us <= clock_tolerance(env.now):
                return
            if self.preempt_pending:  # the host takes the LP: the lock stays held
                self.lock_holder_preemptions += 1
                publish_end(math.inf)
                self.give_up_lp_preempted()
                yield from self.wait_for_lp()
                self.exit_index = exit_index
                self.set_state(state)

    def _released(self) -> None:
        release, self.lock_release = self.lock_release, None
        if release is not None:
            release.succeed()

    def lock_release_event(self):
        """The event that fires when this VP releases the TLB lock it holds (it leaves VTL1: VSM
        TlbLocked; or the stack completes its MemoryAccess emulation: TlbFlushInhibit): already
        triggered if it holds none any more."""
        if not (self.in_vtl1 or self.emulating):
            return self.env.event().succeed()
        if self.lock_release is None:
            self.lock_release = self.env.event()
        return self.lock_release

    def _idle(self):
        """No runnable guest thread: the idle loop's HLT (a Halt exit), off the LP until the thread's
        sleep ends (a timer interrupt) or an interrupt or work arrives; back to the run loop, which
        idles again while there is still nothing to run."""
        env = self.env
        cost = self._exit_cost[I_HALT]
        self.record_exit(I_HALT, 1, cost)
        self.exit_index = I_HALT
        self.set_state(EXIT)
        yield env.timeout(cost)
        self.exit_index = -1
        self.give_up_lp(HALTED)
        if self.irqs or self.requests or self.work:
            return
        self.interruptible = True
        try:
            yield env.timeout(max(0.0, min(self.idle_until_us, self.next_arrival_us) - env.now))
        except Interrupt:
            self.interruptible = False
            yield env.timeout(self.costs.halt_wake_us)  # woken by an interrupt
        self.interruptible = False

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
