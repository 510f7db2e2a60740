"""Logical processors, the host scheduler and the co-tenant partitions.

Owns one question: "when does a VP run, wait for an LP, get preempted or
hand its LP to another?". Runnable VPs of every partition on the host (the
partition under study and its co-tenants) wait in one run queue ordered by
virtual runtime (the LP time each has had, as CFS orders its tree); an LP
runs a VP for at most one slice while others wait: when a slice ends and the
queue is not empty, the VP is asked to give up its LP (it does so at its
next decision point, see vp.VP). A slice timer exists only while someone
waits, so an idle queue costs nothing.

- A VP woken from halt or a suspension is placed at most half a slice ahead
  of the least-run VP (CFS's bounded sleeper credit, place_entity): woken VPs
  run soon, but a partition that halts often cannot starve CPU-bound
  co-tenants (an unbounded head-of-queue preference did: a 16-VP partition
  took 46 % of a host shared with three CPU-bound 16-VP partitions).
- Directed yield (``yield_to``): a spinning VP hands its LP to a runnable VP
  of its own partition that waits in the queue (kvm_vcpu_on_spin, Linux's
  KVM_HC_SCHED_YIELD, Hyper-V's answer to a long spin wait notification).
  Candidates are taken round-robin by VP index after the last VP boosted in
  that partition (kvm_vcpu_on_spin's last_boosted_vcpu); the target runs
  out the yielder's slice, and the yielder queues by its virtual runtime.
- Co-tenants (``CoTenantVp``): VPs of other partitions, CPU-bound or on a
  duty cycle, under the same scheduler. They run no guest model of their
  own; what they do to the partition under study is take LPs and evict its
  TLB entries (tlb.retained_fraction, applied by vp.VP on dispatch).
"""

from __future__ import annotations

import math
from bisect import insort

from simpy import Interrupt


class Host:
    def __init__(self, env, n_lps: int, slice_us: float):
        self.env = env
        self.n_lps = n_lps
        self.free_lps = n_lps
        self.slice_us = slice_us
        self._queue: list = []  # (virtual runtime, arrival number, VP), sorted
        self._arrivals = 0
        self.min_vruntime_us = 0.0  # never decreases (CFS's min_vruntime)
        # VPs (of any partition) holding an LP, in dispatch order: a dict as an ordered set, so that
        # releasing one is O(1) (list.remove took a third of a 4,096-LP run)
        self.running: dict = {}
        self._timer_armed = False
        self.entities = 0  # VPs of every partition on this host
        self.dispatches = 0
        self.preemptions = 0
        self.yields = 0

    @property
    def queue(self) -> list:
        """The waiting VPs, next to run first."""
        return [vp for _, _, vp in self._queue]

    def _enqueue(self, vp, woken: bool) -> None:
        floor = min([self.min_vruntime_us, *(v.vruntime_us for v in self.running)])
        if floor > self.min_vruntime_us:
            self.min_vruntime_us = floor
        if woken:  # bounded sleeper credit
            credit_floor = self.min_vruntime_us - self.slice_us / 2
            if vp.vruntime_us < credit_floor:
                vp.vruntime_us = credit_floor
        self._arrivals += 1
        insort(self._queue, (vp.vruntime_us, self._arrivals, vp))

    def _pop(self):
        return self._queue.pop(0)[2]

    @property
    def overcommitted(self) -> bool:
        """More VPs than LPs: an LP a VP left may run another VP before it returns."""
        return self.entities > self.n_lps

    def acquire(self, vp, woken: bool = False):
        """Give ``vp`` an LP now (returns None) or queue it (returns the
        event that fires when it is dispatched). A VP woken from halt (or
        that just yielded) goes to the head of the queue."""
        if self.free_lps:
            self.free_lps -= 1
            self._dispatch(vp)
            return None
        ev = self.env.event()
        vp.dispatch_event = ev
        self._enqueue(vp, woken)
        self._arm()
        return ev

    def release(self, vp) -> None:
        """``vp`` gives up its LP (halt, suspension, preemption)."""
        del self.running[vp]
        vp.on_lp = False
        vp.preempt_pending = False
        vp.vruntime_us += self.env.now - vp.dispatched_us
        if self._queue:
            nxt = self._pop()
            self._dispatch(nxt)
            ev, nxt.dispatch_event = nxt.dispatch_event, None
            ev.succeed()
        else:
            self.free_lps += 1

    def _dispatch(self, vp) -> None:
        vp.on_lp = True
        vp.dispatched_us = self.env.now
        vp.slice_end_us = self.env.now + self.slice_us
        self.running[vp] = None
        self.dispatches += 1

    # ------------------------------------------------------------ directed yield
    def yield_candidate(self, spinner, prefer=None):
        """A VP of ``spinner``'s partition waiting in the queue (runnable,
        not running: kvm_vcpu_on_spin's "ready"), in queue order, or None.
        With ``prefer`` (a predicate), a VP it accepts comes first
        (IPI-aware directed yield). KVM also skips a vCPU preempted inside
        its own pause-loop handler every other time (in_spin_loop /
        dy_eligible); a VP is in that handler for about a microsecond, so
        the model does not track it."""
        part = spinner.part
        queued = [vp for vp in self.queue if getattr(vp, "part", None) is part]
        if not queued:
            return None
        last = part.last_boosted
        queued.sort(key=lambda vp: (vp.index <= last, vp.index))  # round-robin after the last boosted
        if prefer is not None:
            for vp in queued:
                if prefer(vp):
                    return vp
        return queued[0]

    def yield_to(self, yielder, target) -> None:
        """``yielder`` hands its LP to ``target`` (queued): ``target`` is
        dispatched on it now, for what is left of the yielder's slice; the
        yielder must ``acquire`` again (it queues by its virtual runtime)."""
        self._queue = [e for e in self._queue if e[2] is not target]
        target.part.last_boosted = target.index
        del self.running[yielder]
        yielder.vruntime_us += self.env.now - yielder.dispatched_us
        yielder.on_lp = False
        preempt = yielder.preempt_pending
        yielder.preempt_pending = False
        self._dispatch(target)
        # the target runs out the yielder's slice, not a fresh one: a yield moves the LP within the
        # partition, it does not extend the partition's share against the co-tenants (CFS fairness)
        target.slice_end_us = yielder.slice_end_us
        target.preempt_pending = preempt
        ev, target.dispatch_event = target.dispatch_event, None
        ev.succeed()
        self.yields += 1

    # ------------------------------------------------------------ slices
    def _arm(self) -> None:
        if self._timer_armed:
            return
        waiting = len(self._queue) - sum(1 for v in self.running if v.preempt_pending)
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
        waiting = len(self._queue) - sum(1 for v in self.running if v.preempt_pending)
        for vp in sorted(self.running, key=lambda v: v.slice_end_us):
            if waiting <= 0:
                break
            if not vp.preempt_pending and vp.slice_end_us <= now:
                vp.preempt_pending = True
                self.preemptions += 1
                waiting -= 1
                vp.kick()
        self._arm()


class CoTenantVp:
    """A VP of another partition: runnable for busy periods (forever if
    CPU-bound), halted in between; takes LPs from the host like any VP."""

    __slots__ = ("env", "host", "on_lp", "preempt_pending", "slice_end_us", "dispatch_event", "interruptible",
                 "proc", "stream", "busy_mean_us", "idle_mean_us", "run_us", "vruntime_us", "dispatched_us")

    def __init__(self, env, host: Host, stream, load: str, duty: float, period_us: float):
        self.env = env
        self.host = host
        self.on_lp = False
        self.preempt_pending = False
        self.slice_end_us = 0.0
        self.dispatch_event = None
        self.interruptible = False
        self.vruntime_us = 0.0
        self.dispatched_us = 0.0
        self.stream = stream
        if load == "cpu" or duty >= 1.0:
            self.busy_mean_us, self.idle_mean_us = math.inf, 0.0
        else:
            self.busy_mean_us, self.idle_mean_us = duty * period_us, (1.0 - duty) * period_us
        self.run_us = 0.0
        host.entities += 1
        self.proc = env.process(self._run())

    def kick(self, cancel: bool = False) -> None:
        if self.interruptible:
            self.interruptible = False
            self.proc.interrupt()

    def _run(self):
        env, host = self.env, self.host
        woken = False
        if self.busy_mean_us < math.inf:  # start at a random point of the cycle
            yield env.timeout(self.stream.exp(self.idle_mean_us)) if self.idle_mean_us > 0 else env.timeout(0)
            woken = True
        while True:
            busy = self.busy_mean_us if math.isinf(self.busy_mean_us) else self.stream.exp(self.busy_mean_us)
            while busy > 0:
                ev = host.acquire(self, woken)
                woken = False
                if ev is not None:
                    yield ev
                start = env.now
                self.interruptible = True
                try:
                    yield env.timeout(busy if busy < math.inf else host.slice_us * 1e6)
                    busy = 0.0
                except Interrupt:  # preempted: back to the queue
                    busy -= env.now - start
                self.interruptible = False
                self.run_us += env.now - start
                host.release(self)
            if self.idle_mean_us > 0:
                yield env.timeout(self.stream.exp(self.idle_mean_us))
                woken = True
