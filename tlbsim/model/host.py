"""Logical processors and the host scheduler.

With as many LPs as VPs every VP has its own LP and the scheduler costs no
events. With fewer (overcommit), runnable VPs wait in one FIFO run queue and
an LP runs a VP for at most one slice while others wait: when a slice ends
and the queue is not empty, the VP is asked to give up its LP (it does so at
its next decision point, see vp.VP). A slice timer exists only while someone
waits, so an idle queue costs nothing.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlbsim.model.vp import VP


class Host:
    def __init__(self, env, n_lps: int, slice_us: float):
        self.env = env
        self.free_lps = n_lps
        self.slice_us = slice_us
        self.queue: deque[VP] = deque()
        self.running: list[VP] = []  # VPs holding an LP
        self._timer_armed = False
        self.dispatches = 0
        self.preemptions = 0

    def acquire(self, vp: VP, woken: bool = False):
        """Give ``vp`` an LP now (returns None) or queue it (returns the
        event that fires when it is dispatched). A VP woken from halt goes to
        the head of the queue (Hyper-V's and CFS's wake-up preference)."""
        if self.free_lps:
            self.free_lps -= 1
            self._dispatch(vp)
            return None
        ev = self.env.event()
        vp.dispatch_event = ev
        if woken:
            self.queue.appendleft(vp)
        else:
            self.queue.append(vp)
        self._arm()
        return ev

    def release(self, vp: VP) -> None:
        """``vp`` gives up its LP (halt, suspension, preemption)."""
        self.running.remove(vp)
        vp.on_lp = False
        vp.preempt_pending = False
        if self.queue:
            nxt = self.queue.popleft()
            self._dispatch(nxt)
            ev, nxt.dispatch_event = nxt.dispatch_event, None
            ev.succeed()
        else:
            self.free_lps += 1

    def _dispatch(self, vp: VP) -> None:
        vp.on_lp = True
        vp.slice_end_us = self.env.now + self.slice_us
        self.running.append(vp)
        self.dispatches += 1

    # ------------------------------------------------------------ slices
    def _arm(self) -> None:
        if self._timer_armed:
            return
        waiting = len(self.queue) - sum(1 for v in self.running if v.preempt_pending)
        if waiting <= 0:
            return
        candidates = [v for v in self.running if not v.preempt_pending]
        if not candidates:
            return
        first = min(v.slice_end_us for v in candidates)
        delay = first - self.env.now
        if delay <= 0:
            self._expire(None)
            return
        self._timer_armed = True
        self.env.timeout(delay).callbacks.append(self._expire)

    def _expire(self, _event) -> None:
        self._timer_armed = False
        now = self.env.now
        waiting = len(self.queue) - sum(1 for v in self.running if v.preempt_pending)
        for vp in sorted(self.running, key=lambda v: v.slice_end_us):
            if waiting <= 0:
                break
            if not vp.preempt_pending and vp.slice_end_us <= now:
                vp.preempt_pending = True
                self.preemptions += 1
                waiting -= 1
                vp.kick()
        self._arm()
