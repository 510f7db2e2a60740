"""A VP and its LP (a mixin of ``vp.VP``): waiting for an LP, giving it up to sleep (HLT, a
suspension) or to the host (preemption), directed yields, and the idle loop's and HLT's sleeps. What
the host asks of anything it schedules is host.Schedulable, this mixin's base."""

from __future__ import annotations

import math

from simpy import Interrupt

from tlbsim.model.accounting import DESCHEDULED, EXIT, GUEST, HALTED, I_HALT, SUSPENDED
from tlbsim.model.host import YIELD_FAILED, YIELD_LEFT_LP, Schedulable


class LpUser(Schedulable):
    """The VP's side of the LP protocol (``wait_for_lp``, ``give_up_lp``, ``give_up_lp_preempted``,
    ``descheduled_runnable``, ``yield_lp_to``) and its sleeps (``_idle``, ``_halt``)."""

    __slots__ = ()  # the fields are VP's (one slot layout)

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

    def _idle(self):
        """No runnable guest thread: the idle loop's HLT (a Halt exit), off the LP until the thread's
        sleep ends (a timer interrupt) or an interrupt or work arrives; back to the run loop, which
        idles again while there is still nothing to run."""
        env = self.env
        cost = self._exit_cost[I_HALT]
        self.record_exit(I_HALT, 1, cost)
        self.charge = ((env.now + cost, I_HALT, cost),)
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
