"""A VP holding a TLB lock (a mixin of ``vp.VP``): VTL1 entries (VSM TlbLocked) and the stack's
emulation of a MemoryAccess exit (TlbFlushInhibit), either of which the host may preempt (lock-holder
preemption), and the release event callers suspended on the lock wait for."""

from __future__ import annotations

import math
from functools import partial

from simpy import Interrupt

from tlbsim.model.accounting import EXIT, I_MEMORY, VTL1
from tlbsim.model.timing import clock_tolerance


class LockHolder:
    """VTL1 and MemoryAccess emulation as lock holds (``_hold_lock``), and their release."""

    __slots__ = ()  # the fields are VP's (one slot layout)

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
                if exit_index >= 0:  # the exit's time, counted whole at its start: the rest is still to come
                    self.charge = ((math.inf, exit_index, left_us),)
                self.give_up_lp_preempted()
                yield from self.wait_for_lp()
                if exit_index >= 0:
                    self.charge = ((env.now + left_us, exit_index, left_us),)
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
