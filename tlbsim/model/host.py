"""Logical processors, the host scheduler and the co-tenant partitions.

Owns one question: "when does a VP run, wait for an LP, get preempted or
yield its LP?". Everything that runs on the host's LPs (the partition's VPs
and the co-tenants' VPs) is an *entity* with a virtual runtime (the LP time
it has had). The rules are Linux's fair class, from kernel/sched/fair.c:
``EevdfHost`` (below) for EEVDF (Linux 6.6+, the kvm profile's default) and
``Host`` for CFS (Linux 4.x-6.5: the kernels of the published KVM
measurements), with names kept so that a reader can find each one there:

- ``update_min_vruntime``: the host's ``min_vruntime_us`` follows the least
  virtual runtime among the running entities and the leftmost queued one,
  and never decreases.
- ``place_entity``: an entity woken from a sleep (a VP out of HLT, a
  suspension, or a co-tenant's idle period) is placed at no less than
  ``min_vruntime - sched_latency / 2`` (GENTLE_FAIR_SLEEPERS): the sleeper
  credit is bounded, so a partition that halts often cannot starve CPU-bound
  co-tenants.
- ``check_preempt_wakeup``: a woken entity that finds no idle LP preempts the
  entity running on the LP it last ran on (select_task_rq_fair's prev_cpu
  when no LP is idle) if that one's virtual runtime is ahead of it by more
  than ``wakeup_granularity``.
- ``sched_slice``: an entity runs for ``period / nr_running`` before it is
  preempted while others wait, ``period = max(sched_latency, nr_running x
  min_granularity)``; the tunables scale with ``1 + ilog2(min(LPs, 8))``
  (SCHED_TUNABLESCALING_LOG). ``nr_running`` is the runnable entities per LP.
- ``yield_to`` (kernel/sched/core.c, with yield_to_task_fair and
  pick_next_entity): a directed yield does not hand the LP over. The target
  becomes the *next buddy*, the yielder yields (the *skip buddy*), and the
  LP then runs the target only if that is not unfair: the target's virtual
  runtime is within ``wakeup_granularity`` of the leftmost entity's;
  otherwise the leftmost runs, which may be another partition's VP. It fails
  (the caller keeps its LP) when the target is running or not runnable.

The ``hyperv`` scheduler (the tlfs and openhcl profiles) keeps the same fair
queue with the fixed ``partition.slice_us`` (the TLFS: "hundredths of a
second"), the bounded sleeper credit of half a slice, and no wakeup
preemption: Hyper-V's scheduler is not public beyond its slice and its
types (classic, core, root); that is where the sources stop.

A ``Host`` is one run queue ordered by virtual runtime. Over all the LPs it is
the ``shared`` option (``host.runqueues``): the per-LP queues with
instantaneous idle balancing (an LP that frees picks the least-run waiting
entity), LP identity kept for wakeup preemption (an entity's last LP) and for
an idle LP's choice. The default, ``per_lp`` (model/runqueues.py), is one
``Host`` per LP with the kernel's placement and balancing between them. The kernel's
periodic tick is not simulated: a slice ends exactly when it is used up
(decisions only at events). A slice timer exists only while someone waits,
so a host with a free LP for everyone costs nothing.

Co-tenants (``CoTenantVp``): VPs of other partitions, CPU-bound or on a duty
cycle, under the same scheduler. They run no guest model of their own; what
they do to the partition under study is take LPs and evict its TLB entries
(the time they run on an LP is what a VP that returns there has lost: Host.lp_busy_us, vp.VP._evict).
"""

from __future__ import annotations

import math
from bisect import insort
from dataclasses import dataclass
from functools import partial

from simpy import Interrupt

#: Host.yield_to's outcomes: the target was not ready (nothing changed); the yield took place but the
#: scheduler runs the yielder again (EEVDF); the yielder left its LP
YIELD_FAILED, YIELD_KEPT_LP, YIELD_LEFT_LP = 0, 1, 2


def tunable_scaling(n_lps: int) -> int:
    """SCHED_TUNABLESCALING_LOG (kernel/sched/fair.c get_update_sysctl_factor): 1 + ilog2(min(LPs, 8))."""
    return 1 + (min(max(n_lps, 1), 8).bit_length() - 1)


@dataclass(frozen=True)
class SchedParams:
    """The host scheduler's rules and tunables, us (built from [host] and the profile)."""

    kind: str  # "cfs", "eevdf" or "hyperv"
    latency_us: float  # sysctl_sched_latency (cfs); the fixed slice (hyperv)
    min_granularity_us: float  # sysctl_sched_min_granularity (cfs)
    wakeup_granularity_us: float  # sysctl_sched_wakeup_granularity (cfs); inf: no wakeup preemption
    sleeper_credit_us: float  # place_entity's bound: latency / 2 (GENTLE_FAIR_SLEEPERS)

    @classmethod
    def cfs(cls, n_lps: int, latency_us: float = 0.0, min_granularity_us: float = 0.0,
            wakeup_granularity_us: float = 0.0) -> SchedParams:
        """Linux's defaults (kernel/sched/fair.c: 6 ms, 0.75 ms, 1 ms, each x tunable_scaling) where 0."""
        f = tunable_scaling(n_lps)
        latency = latency_us or 6000.0 * f
        return cls("cfs", latency, min_granularity_us or 750.0 * f, wakeup_granularity_us or 1000.0 * f,
                   latency / 2)

    @classmethod
    def eevdf(cls, n_lps: int, base_slice_us: float = 0.0) -> SchedParams:
        """EEVDF (Linux 6.6+): the base slice (sysctl_sched_base_slice 0.75 ms x tunable_scaling) where 0;
        ``latency_us`` holds it."""
        base = base_slice_us or 750.0 * tunable_scaling(n_lps)
        return cls("eevdf", base, base, math.inf, base)

    @classmethod
    def hyperv(cls, slice_us: float) -> SchedParams:
        return cls("hyperv", slice_us, slice_us, math.inf, slice_us / 2)

    @property
    def buddy_granularity_us(self) -> float:
        """How far a next buddy may be ahead of the leftmost entity and still be picked
        (pick_next_entity's wakeup_preempt_entity < 1): the wakeup granularity; the slice under the
        hyperv scheduler, which publishes no buddy rule."""
        return self.latency_us if self.wakeup_granularity_us == math.inf else self.wakeup_granularity_us

    def slice_for(self, nr_running: int) -> float:
        """sched_slice for one of ``nr_running`` equal-weight entities on an LP (fixed for hyperv)."""
        if self.kind != "cfs" or nr_running <= 1:
            return self.latency_us
        period = self.latency_us
        if nr_running * self.min_granularity_us > period:  # more than sched_nr_latency entities
            period = nr_running * self.min_granularity_us
        return period / nr_running


class Schedulable:
    """What the host may ask of anything it schedules (a guest VP, a co-tenant VP): a small protocol,
    so that the host writes no field of the entity but its own bookkeeping.

    The entity declares these fields in its own ``__slots__`` (one slot layout per class): what the
    protocol's methods keep, ``on_lp``, ``lp``, ``dispatched_us``, ``left_busy_us``, ``preempt_pending``,
    ``dispatch_event``; and the scheduler's per-entity state (Linux's ``sched_entity``), which only
    the host reads and writes: ``vruntime_us``, ``deadline_us``, ``vlag_us``. It implements ``kick``."""

    __slots__ = ()

    def kick(self) -> None:
        """Look at a pending preemption now, if waiting interruptibly (guest code, a spin, HLT)."""
        raise NotImplementedError

    def dispatched(self, lp: int, now: float) -> None:
        """The host gave it LP ``lp`` at ``now``."""
        self.on_lp = True
        self.lp = lp
        self.dispatched_us = now

    def taken_off_lp(self, lp_busy_us: float) -> None:
        """The host took its LP back; ``lp_busy_us``: that LP's busy time then (what runs there after it
        evicts its TLB entries)."""
        self.on_lp = False
        self.preempt_pending = False
        self.left_busy_us = lp_busy_us

    def queued(self, event) -> None:
        """It waits for an LP: ``event`` fires when it is dispatched."""
        self.dispatch_event = event

    def take_dispatch_event(self):
        """Dispatched from the queue: the event to fire (it no longer waits)."""
        event, self.dispatch_event = self.dispatch_event, None
        return event

    def preempt(self) -> None:
        """The host preempts it (slice end, wakeup preemption): it gives up its LP at its next chance."""
        self.preempt_pending = True
        self.kick()


class Host:
    def __init__(self, env, n_lps: int, sched: SchedParams, lps=None, lp_busy_us=None, lp_curr=None):
        """``lps``: the LPs this queue serves (all by default; one for a per-LP run queue,
        runqueues.PerLpHost, which also shares one ``lp_busy_us`` and one ``lp_curr`` among its
        queues, each writing its own LP's entry)."""
        self.env = env
        self.n_lps = n_lps
        self.sched = sched
        self.slice_us = sched.latency_us  # the longest slice (co-tenants' "forever" is a multiple of it)
        self._queue: list = []  # (virtual runtime, arrival number, entity), sorted
        self._arrivals = 0
        self.min_vruntime_us = 0.0  # never decreases (update_min_vruntime)
        # entities holding an LP, in dispatch order: a dict as an ordered set, so that releasing one
        # is O(1) (list.remove took a third of a 4,096-LP run)
        self.running: dict = {}
        self._lp_curr: list = [None] * n_lps if lp_curr is None else lp_curr  # the entity on each LP
        self._idle_set: set[int] = set(range(n_lps) if lps is None else lps)  # (set.pop on ints is deterministic)
        # time each LP ran entities (to the last one that left it)
        self.lp_busy_us = [0.0] * n_lps if lp_busy_us is None else lp_busy_us
        self._timer_armed = False
        self._timer_due = math.inf
        self._timer_generation = 0
        self.entities = 0  # entities of every partition on this host
        self.dispatches = 0
        self.preemptions = 0  # at the end of a slice
        self.wakeup_preemptions = 0
        self.yields = 0  # directed yields that took place (yield_to succeeded)
        self.yields_to_target = 0  # ... and the LP then ran the target (not another entity)
        self.yield_failures = 0

    @property
    def free_lps(self) -> int:
        return len(self._idle_set)

    @property
    def queue(self) -> list:
        """The waiting entities, next to run first."""
        return [vp for _, _, vp in self._queue]

    @property
    def overcommitted(self) -> bool:
        """More entities than LPs: an LP a VP left may run another VP before it returns."""
        return self.entities > self.n_lps

    def balance_counters(self) -> dict[str, int]:
        """What balancing between run queues did (none here: one queue; runqueues.PerLpHost)."""
        return {}

    # ------------------------------------------------------------ fair-class bookkeeping
    def vruntime_now(self, entity) -> float:
        """``entity``'s virtual runtime now (a running one's includes its time on the LP so far)."""
        if entity.on_lp:
            return entity.vruntime_us + (self.env.now - entity.dispatched_us)
        return entity.vruntime_us

    def update_min_vruntime(self) -> float:
        """update_min_vruntime: follow the least-run running or leftmost queued entity, never back."""
        now = self.env.now
        least = math.inf
        for v in self.running:
            r = v.vruntime_us + (now - v.dispatched_us)
            if r < least:
                least = r
        if self._queue and self._queue[0][0] < least:
            least = self._queue[0][0]
        if least < math.inf and least > self.min_vruntime_us:
            self.min_vruntime_us = least
        return self.min_vruntime_us

    def _place_woken(self, entity) -> None:
        """place_entity for a waking entity: no more than the sleeper credit behind min_vruntime. Only
        an overcommitted host orders anyone by virtual runtime, so a dedicated one skips the scan."""
        if not self.overcommitted:
            return
        floor = self.update_min_vruntime() - self.sched.sleeper_credit_us
        if entity.vruntime_us < floor:
            entity.vruntime_us = floor

    def _nr_running(self) -> int:
        """Runnable entities per LP (the LP's cfs_rq.nr_running, with the queue shared evenly)."""
        return -(-(len(self._queue) + len(self.running)) // self.n_lps)

    # ------------------------------------------------------------ LPs
    def acquire(self, entity, woken: bool = False):
        """Give ``entity`` an LP now (returns None) or queue it (returns the event that fires when it
        is dispatched). ``woken``: it comes out of a sleep (HLT, a suspension, an idle period), so it
        is placed (place_entity) and may preempt (check_preempt_wakeup)."""
        if woken:
            self._place_woken(entity)
        if self._idle_set:
            idle = self._idle_set
            lp = entity.lp
            if lp in idle:
                idle.discard(lp)
            else:
                lp = idle.pop()
            self._dispatch(entity, lp)
            return None
        ev = self.env.event()
        entity.queued(ev)
        self._enqueue(entity)
        if woken:
            self._check_preempt_wakeup(entity)
        self._arm()
        return ev

    def _enqueue(self, entity) -> None:
        self._arrivals += 1
        insort(self._queue, (entity.vruntime_us, self._arrivals, entity))

    def _check_preempt_wakeup(self, woken) -> None:
        """check_preempt_wakeup: the entity on ``woken``'s last LP is preempted when it is ahead of
        ``woken`` by more than the wakeup granularity."""
        gran = self.sched.wakeup_granularity_us
        if gran == math.inf or woken.lp is None:
            return
        curr = self._lp_curr[woken.lp]
        if curr is None or curr.preempt_pending:
            return
        if self.vruntime_now(curr) - woken.vruntime_us > gran:
            self.wakeup_preemptions += 1
            curr.preempt()

    def release(self, entity) -> None:
        """``entity`` gives up its LP (halt, suspension, preemption, idle period); the LP runs the
        least-run waiting entity, or idles."""
        lp = self._put_prev(entity)
        if self._queue:
            self._dispatch_waiting(self._pick(), lp)
            self._arm()  # entities still wait: the one just dispatched has a slice to time
        else:
            self._lp_curr[lp] = None
            self._idle_set.add(lp)

    def _pick(self):
        """The waiting entity an LP runs next, taken off the queue (CFS: the least-run)."""
        return self._unqueue(0)

    def _unqueue(self, index: int):
        """Take the waiting entity at ``index`` off the queue (a migration, a buddy)."""
        return self._queue.pop(index)[2]

    def _put_prev(self, entity) -> int:
        del self.running[entity]
        ran = self.env.now - entity.dispatched_us
        entity.vruntime_us += ran
        lp = entity.lp
        busy = self.lp_busy_us[lp] + ran
        self.lp_busy_us[lp] = busy
        entity.taken_off_lp(busy)
        return lp

    def _dispatch_waiting(self, entity, lp: int) -> None:
        self._dispatch(entity, lp)
        entity.take_dispatch_event().succeed()

    def _dispatch(self, entity, lp: int) -> None:
        entity.dispatched(lp, self.env.now)
        self._lp_curr[lp] = entity
        self.running[entity] = None
        self.dispatches += 1

    # ------------------------------------------------------------ directed yield
    @staticmethod
    def can_yield_to(target) -> bool:
        """yield_to's test: the target is runnable and not running (queued for an LP)."""
        return target.dispatch_event is not None and not target.on_lp

    def yield_to(self, yielder, target) -> int:
        """yield_to(): ``yielder`` (on an LP) yields with ``target`` as the next buddy. Returns
        YIELD_FAILED when ``target`` is running or not runnable (nothing changes); YIELD_KEPT_LP when
        the yield took place but the scheduler runs the yielder again (``_yield_task``: EEVDF);
        YIELD_LEFT_LP when the yielder left its LP (it has been told, ``descheduled_runnable``, and
        queues again by its own acquire: the skip buddy, after this pick) and the LP runs
        ``_yield_pick``'s choice."""
        if not self.can_yield_to(target):
            self.yield_failures += 1
            return YIELD_FAILED
        self.yields += 1
        if not self._yield_task(yielder):
            return YIELD_KEPT_LP
        yielder.descheduled_runnable()
        lp = self._put_prev(yielder)
        chosen = self._yield_pick(target)
        if chosen is target:
            self.yields_to_target += 1
        self._dispatch_waiting(chosen, lp)
        return YIELD_LEFT_LP

    def _yield_task(self, yielder) -> bool:
        """yield_task_fair: does the yielder leave its LP? Under CFS always (the skip buddy makes the
        LP run another entity)."""
        return True

    def _yield_pick(self, target):
        """The entity the yielder's LP runs, taken off the queue: CFS's pick_next_entity runs the
        next buddy (``target``) if its virtual runtime is within the wakeup granularity of the
        leftmost's, else the leftmost."""
        queue = self._queue
        leftmost = queue[0][2]
        if target is leftmost or target.vruntime_us - leftmost.vruntime_us > self.sched.buddy_granularity_us:
            return self._unqueue(0)
        return self._unqueue(next(i for i, e in enumerate(queue) if e[2] is target))

    # ------------------------------------------------------------ slices
    def slice_us_now(self) -> float:
        """The slice of a running entity under the current load (sched_slice, re-read at each
        decision as the kernel's tick re-reads it)."""
        return self.sched.slice_for(self._nr_running())

    def _arm(self) -> None:
        """Set the slice timer for the first running entity whose slice ends, if anyone waits. A
        timer already set stays unless the load shortened the slice (more entities: a new, earlier
        timer; the old one is void)."""
        waiting = len(self._queue) - sum(1 for v in self.running if v.preempt_pending)
        if waiting <= 0:
            return
        candidates = [v for v in self.running if not v.preempt_pending]
        if not candidates:
            return
        first = self._first_slice_end(candidates)
        if self._timer_armed and first >= self._timer_due:
            return
        delay = first - self.env.now
        if delay <= 0:
            self._timer_generation += 1  # any timer set is void
            self._expire(None, self._timer_generation)
            return
        self._timer_armed = True
        self._timer_due = first
        self._timer_generation += 1
        self.env.timeout(delay).callbacks.append(partial(self._expire, generation=self._timer_generation))

    def _expire(self, _event, generation: int) -> None:
        if generation != self._timer_generation:
            return  # replaced by an earlier timer
        self._timer_armed = False
        now = self.env.now
        waiting = len(self._queue) - sum(1 for v in self.running if v.preempt_pending)
        slice_us = self.slice_us_now()
        for vp in sorted(self.running, key=lambda v: v.dispatched_us):
            if waiting <= 0:
                break
            if not vp.preempt_pending and self._slice_over(vp, slice_us, now):
                self.preemptions += 1
                waiting -= 1
                vp.preempt()
        self._arm()

    def _first_slice_end(self, candidates) -> float:
        """When the first of ``candidates`` (running) has used its slice (CFS: all have the same)."""
        return min(v.dispatched_us for v in candidates) + self.slice_us_now()

    def _slice_over(self, entity, slice_us: float, now: float) -> bool:
        """check_preempt_tick: ``entity`` has run its slice and, someone waiting, is preempted."""
        return entity.dispatched_us + slice_us <= now


class EevdfHost(Host):
    """Linux's EEVDF fair class (kernel/sched/fair.c, 6.6 to 6.13; names as there), in the same one
    queue for every LP:

    - ``avg_vruntime``: V, the mean virtual runtime of the runnable entities (running ones at their
      current virtual runtime; equal weights), kept as running sums, O(1).
    - an entity is *eligible* when its virtual runtime is at most V (lag >= 0);
      ``pick_eevdf``: the eligible waiting entity with the earliest virtual deadline, where the
      deadline is the virtual runtime plus the base slice (sysctl_sched_base_slice 0.75 ms x
      tunable_scaling: 3 ms on 8 LPs or more).
    - ``update_deadline``: a running entity whose virtual runtime reaches its deadline gets a new
      one a slice later and is preempted if an eligible waiting entity has an earlier deadline.
    - ``place_entity`` with PLACE_LAG: an entity keeps its lag across a sleep
      (``update_entity_lag`` at dequeue, clamped to twice the slice) and is placed at
      ``V - lag x (n + 1) / n`` when it wakes, with a fresh deadline.
    - wakeup preemption (check_preempt_wakeup_fair with RUN_TO_PARITY): the woken entity preempts
      the one on its last LP only if that one is no longer eligible and the woken one is, with an
      earlier deadline: an eligible running entity keeps its slice.
    - ``yield_to`` / ``yield_task_fair``: the yielder's deadline moves a slice later; the next
      buddy the target becomes is not honoured at pick time before PICK_BUDDY (NEXT_BUDDY is off):
      the LP goes to pick_eevdf's choice, the yielder included (then the yield changes nothing).
    - DELAY_DEQUEUE (6.12+) and PICK_BUDDY are not modelled."""

    def __init__(self, env, n_lps: int, sched: SchedParams, lps=None, lp_busy_us=None, lp_curr=None):
        super().__init__(env, n_lps, sched, lps, lp_busy_us, lp_curr)
        self.slice_us = sched.latency_us
        self._queued_sum = 0.0  # sum of the waiting entities' virtual runtimes
        self._running_base = 0.0  # sum over running entities of (virtual runtime at dispatch - dispatch time)

    # ------------------------------------------------------------ V and eligibility
    def _renew_deadline(self, entity, v_now: float) -> None:
        """update_deadline, lazily: while the entity's virtual runtime has reached its deadline, the
        deadline moves one slice on (the kernel does it at the tick that finds it reached)."""
        d = entity.deadline_us
        floor = v_now + 1e-9 + v_now * 1e-15  # a deadline within rounding of now is reached
        if d <= floor:
            slice_us = self.sched.latency_us
            d += (math.floor((v_now - d) / slice_us) + 1) * slice_us
            while d <= floor:  # the division rounded down at an exact multiple
                d += slice_us
            entity.deadline_us = d

    def avg_vruntime(self) -> float:
        n = len(self._queue) + len(self.running)
        if not n:
            self._queued_sum = self._running_base = 0.0  # nothing runnable: drop the sums' rounding
            return self.min_vruntime_us
        return (self._queued_sum + self._running_base + len(self.running) * self.env.now) / n

    def _enqueue(self, entity) -> None:
        super()._enqueue(entity)
        self._queued_sum += entity.vruntime_us

    def _unqueue(self, index: int):
        v, _, entity = self._queue.pop(index)
        self._queued_sum -= v
        return entity

    def _dispatch(self, entity, lp: int) -> None:
        super()._dispatch(entity, lp)
        self._running_base += entity.vruntime_us - entity.dispatched_us

    def _put_prev(self, entity) -> int:
        v_now = entity.vruntime_us + (self.env.now - entity.dispatched_us)
        limit = 2.0 * self.sched.latency_us
        lag = self.avg_vruntime() - v_now  # update_entity_lag, with the entity still counted
        entity.vlag_us = limit if lag > limit else -limit if lag < -limit else lag
        self._renew_deadline(entity, v_now)
        self._running_base -= entity.vruntime_us - entity.dispatched_us
        lp = super()._put_prev(entity)
        self.min_vruntime_us = max(self.min_vruntime_us, min(v_now, self._queue[0][0]) if self._queue else v_now)
        return lp

    def _best(self, also=None):
        """pick_eevdf over the waiting entities (and ``also``, if given): (index in the queue or -1
        for ``also``, entity). The eligible one with the earliest deadline; if none is eligible, the
        least-run."""
        big_v = self.avg_vruntime()
        big_v += 1e-9 + abs(big_v) * 1e-12  # eligible within the running sums' rounding
        best, best_i, best_d = None, 0, math.inf
        for i, (v, _, e) in enumerate(self._queue):
            if v > big_v:
                break  # sorted by virtual runtime: the rest are not eligible
            if e.deadline_us < best_d:
                best, best_i, best_d = e, i, e.deadline_us
        if also is not None and also.vruntime_us <= big_v and also.deadline_us < best_d:
            return -1, also
        if best is None:
            return 0, self._queue[0][2]
        return best_i, best

    def _pick(self):
        i, _ = self._best()
        return self._unqueue(i)

    # ------------------------------------------------------------ placement and preemption
    def _place_woken(self, entity) -> None:
        n = len(self._queue) + len(self.running)
        lag = entity.vlag_us * (n + 1) / n if n else 0.0
        entity.vruntime_us = self.avg_vruntime() - lag
        entity.deadline_us = entity.vruntime_us + self.sched.latency_us

    def acquire(self, entity, woken: bool = False):
        if not woken and entity.deadline_us <= entity.vruntime_us:  # first run, or its slice used up
            entity.deadline_us = entity.vruntime_us + self.sched.latency_us
        return super().acquire(entity, woken)

    def _check_preempt_wakeup(self, woken) -> None:
        if woken.lp is None:
            return
        curr = self._lp_curr[woken.lp]
        if curr is None or curr.preempt_pending:
            return
        big_v = self.avg_vruntime()
        big_v += 1e-9 + abs(big_v) * 1e-12  # eligible within the running sums' rounding
        v_curr = self.vruntime_now(curr)
        self._renew_deadline(curr, v_curr)
        if v_curr > big_v and woken.vruntime_us <= big_v and woken.deadline_us < curr.deadline_us:
            self.wakeup_preemptions += 1
            curr.preempt()

    # ------------------------------------------------------------ slices
    def _first_slice_end(self, candidates) -> float:
        return min(v.dispatched_us + max(0.0, v.deadline_us - v.vruntime_us) for v in candidates)

    def _slice_over(self, entity, slice_us: float, now: float) -> bool:
        """update_deadline: past its deadline the entity gets a new one; it is preempted if pick_eevdf
        would now choose a waiting entity over it."""
        if entity.dispatched_us + (entity.deadline_us - entity.vruntime_us) > now:
            return False
        v_now = self.vruntime_now(entity)
        self._renew_deadline(entity, v_now)
        while entity.dispatched_us + (entity.deadline_us - entity.vruntime_us) <= now:  # rounding at large times
            entity.deadline_us += self.sched.latency_us
        saved, entity.vruntime_us = entity.vruntime_us, v_now  # compared at its current virtual runtime
        i, chosen = self._best(also=entity)
        entity.vruntime_us = saved
        return i >= 0

    # ------------------------------------------------------------ directed yield
    def _yield_task(self, yielder) -> bool:
        """yield_task_fair: the yielder's deadline moves a slice later; then does pick_eevdf run
        another entity (True) or the yielder again (False: the yield changes nothing else)?"""
        v_now = self.vruntime_now(yielder)
        self._renew_deadline(yielder, v_now)
        yielder.deadline_us += self.sched.latency_us
        saved, yielder.vruntime_us = yielder.vruntime_us, v_now
        i, _ = self._best(also=yielder)
        yielder.vruntime_us = saved
        return i >= 0

    def _yield_pick(self, target):
        return self._pick()  # the next buddy is not honoured (NEXT_BUDDY off, no PICK_BUDDY)

class CoTenantVp(Schedulable):
    """A VP of another partition: runnable for busy periods (forever if
    CPU-bound), halted in between; takes LPs from the host like any VP."""

    __slots__ = ("env", "host", "on_lp", "preempt_pending", "dispatch_event", "interruptible",
                 "proc", "stream", "busy_mean_us", "idle_mean_us", "run_us", "vruntime_us", "dispatched_us", "lp",
                 "deadline_us", "vlag_us", "left_busy_us")

    def __init__(self, env, host: Host, stream, load: str, duty: float, period_us: float):
        self.env = env
        self.host = host
        self.on_lp = False
        self.preempt_pending = False
        self.dispatch_event = None
        self.interruptible = False
        self.vruntime_us = 0.0
        self.dispatched_us = 0.0
        self.lp = None
        self.left_busy_us = 0.0
        self.deadline_us = 0.0  # EEVDF's virtual deadline
        self.vlag_us = 0.0  # EEVDF's lag, kept across a sleep
        self.stream = stream
        if load == "cpu" or duty >= 1.0:
            self.busy_mean_us, self.idle_mean_us = math.inf, 0.0
        else:
            self.busy_mean_us, self.idle_mean_us = duty * period_us, (1.0 - duty) * period_us
        self.run_us = 0.0
        host.entities += 1
        self.proc = env.process(self._run())

    def kick(self) -> None:
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
                if self.preempt_pending:  # preempted (a wakeup) before it could resume: back to the queue
                    host.release(self)
                    continue
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


def make_host(env, n_lps: int, sched: SchedParams, runqueues: str = "shared"):
    """The host with ``sched``'s rules: EevdfHost for "eevdf", else Host (cfs, hyperv), over one shared
    run queue; ``runqueues = "per_lp"``: runqueues.PerLpHost, a queue of those rules per LP with
    wakeup placement and load balancing."""
    if runqueues == "per_lp":
        from tlbsim.model.runqueues import PerLpHost
        return PerLpHost(env, n_lps, sched)
    return (EevdfHost if sched.kind == "eevdf" else Host)(env, n_lps, sched)
