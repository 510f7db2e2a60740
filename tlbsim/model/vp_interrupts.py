"""Interrupts and kernel work reaching a VP (a mixin of ``vp.VP``): IPIs posted to it and taken
with their flush handlers, VF work queued on it, the kicks that get it out of guest code (the
stack's Canceled exit, the hypervisor's interruption) and the time they cost (``_spend``: an exit and
the work after it in one timeout)."""

from __future__ import annotations

from tlbsim.model.accounting import (
    CHARGE_IPI_INTERRUPT,
    EXIT,
    FLUSH,
    HALTED,
    I_CANCELED,
    I_MSR,
    SPINNING,
    VF,
    VpState,
)
from tlbsim.model.simpy_compat import resume_with_interrupt
from tlbsim.model.tlb import FlushScope

#: What kicked a VP out of guest code (VP.kicked): the stack's Canceled exit, or the hypervisor's
#: interruption to deliver an IPI (no exit to the stack).
KICK_CANCELED, KICK_IPI = 1, 2


def wake_for_ipi(vp) -> None:
    """Resume ``vp``'s process with ``simpy.Interrupt`` now, from the callback of the event that
    delivered its IPI, instead of scheduling an Interruption for the same instant: one SimPy event
    fewer per IPI target, and the same order of everything else. That order argument: the delivery
    is a NORMAL event at time t, so no URGENT event of time t is pending when it is processed, and
    the Interruption (URGENT, t) ``Process.interrupt`` would schedule is the very next event
    processed; resuming here is resuming at that same point (``guest._deliver_all`` posts every
    target's IPI first, then wakes them in target order, as their Interruptions would have run).
    Only from an event's callback, never from inside a process step.

    SimPy's internals are used in simpy_compat only; tests/test_mechanisms.py checks IPI shootdowns
    against the Interruption path."""
    resume_with_interrupt(vp.proc, vp.env)


class InterruptTarget:
    """``post_ipi`` / ``take_interrupts``, ``post_work`` / ``run_work``, ``kick`` and ``_spend``."""

    __slots__ = ()  # the fields are VP's (one slot layout)

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
        start = env.now
        if kick == KICK_CANCELED:
            self.record_exit(I_CANCELED, 1, exit_us)
            self.exit_index = I_CANCELED
            charge = (start + exit_us, I_CANCELED, exit_us)
        else:  # the hypervisor's own: not an exit to the stack
            self.ipi_interrupt_us += exit_us
            charge = (start + exit_us, CHARGE_IPI_INTERRUPT, exit_us)
        self.charge = (*(c for c in self.charge if c[0] > start), charge)  # with a handler's EOIs
        self.set_state(EXIT)
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
                # the EOIs end the handler: due when its timeout ends
                self.charge = ((self.env.now + self._spend_us(cost + self._eoi_us * len(irqs)), I_MSR,
                                self._eoi_us * len(irqs)),)
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
