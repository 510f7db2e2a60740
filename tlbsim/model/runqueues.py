"""Per-LP run queues (``host.runqueues = "per_lp"``): a run queue of the host's fair-class rules on
each LP, with the kernel's wakeup placement and load balancing between them.

Owns one question: "on which LP's queue does a runnable entity wait, and when does it move?". Each
LP's queue is a one-LP ``host.Host`` (CFS, hyperv) or ``host.EevdfHost`` (EEVDF) with its own
min_vruntime / avg_vruntime, slice timer and preemption rules; this module adds what connects them,
read in kernel/sched/fair.c and kernel/sched/topology.c (5.x to 6.x, names as there):

- **select_task_rq_fair / select_idle_sibling** (wakeup placement): an entity that becomes runnable
  goes to its last LP if idle, else to the first idle LP scanning from the one after it
  (for_each_cpu_wrap from target + 1, one last-level cache assumed), else to its last LP's queue.
  A first run goes to the least loaded LP (find_idlest_cpu). wake_affine (the waker's LP) is not
  modelled: the waker here is the hypervisor or a timer, not a task on an LP.
- **migrate_task_rq_fair / place_entity**: a migrating entity keeps its virtual runtime relative to
  its queue: CFS subtracts the old queue's min_vruntime and adds the new one's; EEVDF keeps its lag
  against the queue's avg_vruntime (applied here as the same shift; a woken EEVDF entity is placed
  from its saved lag anyway).
- **newidle_balance / detach_tasks** (an LP about to idle): it pulls one waiting entity (preemptible
  kernels stop after the first) from the busiest queue (most runnable entities), the least recently
  run first (the tail of cfs_tasks); an entity that left an LP less than
  ``sysctl_sched_migration_cost`` (0.5 ms) ago is cache hot and not moved (can_migrate_task /
  task_hot). If every candidate is hot the LP idles, and balances again when the first turns cold:
  where the kernel's idle balance (an idle LP's own, every sd_weight ms, or the nohz kick from a busy
  LP's tick) would find it, at the earliest moment it could succeed. The avg_idle gate of
  newidle_balance is not modelled.
- **rebalance_domains / load_balance** (periodic): an LP balances at most every ``balance_interval x
  busy_factor`` (topology.c sd_init: sd_weight ms x 16 for a busy LP, one domain of all the LPs) and
  pulls half the difference in runnable entities from the busiest queue when that is 2 or more.
  Without a tick this runs at the scheduling events that could change it: a slice's end on some LP
  checks every LP whose interval has passed.
- **yield_to** (kernel/sched/core.c) across queues: yield_to_task_fair marks the target as its
  queue's next buddy and yields the caller on its own queue, then ``resched_curr(p_rq)``: the
  target's LP picks again, and runs the target if pick_next_entity would (CFS: within the wakeup
  granularity of the leftmost, the running entity included; EEVDF: pick_eevdf's choice, the next
  buddy not honoured, and with RUN_TO_PARITY an eligible running entity keeps its LP). The
  yielder's own LP runs its queue's next entity, or the yielder again when that queue is empty
  (yield_task_fair: "are we the only task in the tree?"): a directed yield hands nothing over,
  and a spinner alone on its LP keeps spinning.

What the shared queue (``runqueues = "shared"``) assumes instead: instantaneous balancing, so that
a freed LP runs the least-run waiting entity of the whole host. docs/model.md "Host scheduling"
gives the measured difference."""

from __future__ import annotations

import math
from functools import partial

from tlbsim.model.host import YIELD_FAILED, YIELD_KEPT_LP, YIELD_LEFT_LP, EevdfHost, Host, SchedParams

#: sysctl_sched_migration_cost (kernel/sched/fair.c): a task that ran this recently is cache hot, us
MIGRATION_COST_US = 500.0
#: sd_init's busy_factor (kernel/sched/topology.c, 16 since 5.10; 32 before)
BUSY_FACTOR = 16


class _LpQueue:
    """What makes a fair-class host one LP's run queue: its load is its own, its overcommit is the
    host's, its pick honours a next buddy set by a yield from another LP, and each slice end lets
    the host balance."""

    owner: PerLpHost
    lp_id: int
    next_buddy: object
    yield_target: object

    @property
    def overcommitted(self) -> bool:
        return self.owner.entities > self.owner.n_lps

    def _nr_running(self) -> int:
        return len(self._queue) + len(self.running)

    def _pick(self):
        buddy = self.next_buddy
        if buddy is not None:  # pick_next_entity: the next buddy, unless too unfair to the leftmost
            self.next_buddy = None
            for i, item in enumerate(self._queue):
                if item[2] is buddy:
                    if item[0] - self._queue[0][0] <= self.sched.buddy_granularity_us:
                        return self._counted(self._unqueue(i))
                    break
        return self._counted(super()._pick())

    def _counted(self, entity):
        """The pick after a directed yield from another LP ran its target: count it."""
        if self.yield_target is not None:
            if entity is self.yield_target:
                self.owner._yields_to_target += 1
            self.yield_target = None
        return entity

    # the host keeps the set of LPs with someone waiting (balancing looks only there)
    def _enqueue(self, entity) -> None:
        super()._enqueue(entity)
        self.owner.waiting_lps.add(self.lp_id)

    def _unqueue(self, index: int):
        entity = super()._unqueue(index)
        if not self._queue:
            self.owner.waiting_lps.discard(self.lp_id)
        return entity

    def _yield_pick(self, target):
        self.next_buddy = None  # this yield sets its own (Host._yield_pick applies it)
        return super()._yield_pick(target)

    def _put_prev(self, entity) -> int:
        self.update_min_vruntime()  # the kernel's update_curr keeps it moving while an entity runs
        return super()._put_prev(entity)

    def _expire(self, event, generation: int) -> None:
        live = generation == self._timer_generation
        super()._expire(event, generation)
        if live:
            self.owner.balance_tick()

    def leftmost_other(self, curr):
        """pick_next_entity's leftmost over the waiting entities and ``curr`` (running): the entity
        with the least virtual runtime now."""
        best, best_v = curr, self.vruntime_now(curr)
        if self._queue and self._queue[0][0] < best_v:
            best = self._queue[0][2]
        return best


class CfsLpQueue(_LpQueue, Host):
    pass


class EevdfLpQueue(_LpQueue, EevdfHost):
    pass


class PerLpHost:
    """The host as one run queue per LP (see the module's docstring). It offers what ``host.Host``
    offers the entities (acquire, release, yield_to, can_yield_to, lp_busy_us, slice_us, entities)
    and its counters."""

    def __init__(self, env, n_lps: int, sched: SchedParams):
        self.env = env
        self.n_lps = n_lps
        self.sched = sched
        self.slice_us = sched.latency_us
        self.lp_busy_us = [0.0] * n_lps
        lp_curr: list = [None] * n_lps  # the entity on each LP (each queue writes its own)
        cls = EevdfLpQueue if sched.kind == "eevdf" else CfsLpQueue
        self.rqs = []
        for lp in range(n_lps):
            rq = cls(env, n_lps, sched, lps=(lp,), lp_busy_us=self.lp_busy_us, lp_curr=lp_curr)
            rq.owner, rq.lp_id, rq.next_buddy, rq.yield_target = self, lp, None, None
            self.rqs.append(rq)
        self.idle_lps: set[int] = set(range(n_lps))
        self.waiting_lps: set[int] = set()  # LPs whose queue holds a waiting entity
        self.entities = 0
        self._queued_on: dict = {}  # a waiting entity -> the LP whose queue it waits in
        self._left_at: dict = {}  # an entity -> when it last left an LP (task_hot)
        self.balance_interval_us = n_lps * 1000.0 * BUSY_FACTOR  # sd_weight ms x busy_factor
        self._next_balance = [self.balance_interval_us] * n_lps
        self._next_due = self.balance_interval_us  # the earliest of them
        self._retry_due = [math.inf] * n_lps  # an idle LP's next balance, when every candidate was hot
        self._yields = self._yields_to_target = self._yield_failures = 0
        self.yield_reschedules = 0  # a target's LP told to pick again (resched_curr(p_rq))
        self.idle_kicks = 0  # balances of an idle LP that waited for a hot entity to turn cold
        self.migrations = 0  # entities moved to another LP's queue or run there (any cause)
        self.newidle_pulls = 0
        self.balance_pulls = 0

    # ------------------------------------------------------------ what the entities and reports read
    @property
    def dispatches(self) -> int:
        return sum(rq.dispatches for rq in self.rqs)

    @property
    def preemptions(self) -> int:
        return sum(rq.preemptions for rq in self.rqs)

    @property
    def wakeup_preemptions(self) -> int:
        return sum(rq.wakeup_preemptions for rq in self.rqs)

    @property
    def yields(self) -> int:
        return self._yields

    @property
    def yields_to_target(self) -> int:
        return self._yields_to_target + sum(rq.yields_to_target for rq in self.rqs)

    @property
    def yield_failures(self) -> int:
        return self._yield_failures

    @property
    def free_lps(self) -> int:
        return len(self.idle_lps)

    @property
    def overcommitted(self) -> bool:
        return self.entities > self.n_lps

    @property
    def queue(self) -> list:
        """The waiting entities, LP by LP."""
        return [e for rq in self.rqs for e in rq.queue]

    def runnable_on(self, lp: int) -> int:
        """nr_running of ``lp``'s queue (running and waiting entities)."""
        return self.rqs[lp]._nr_running()

    can_yield_to = staticmethod(Host.can_yield_to)

    def balance_counters(self) -> dict[str, int]:
        return {"lp_migrations": self.migrations, "newidle_pulls": self.newidle_pulls,
                "balance_pulls": self.balance_pulls, "idle_kicks": self.idle_kicks,
                "yield_reschedules": self.yield_reschedules}

    # ------------------------------------------------------------ placement
    def _select_lp(self, entity) -> int:
        """select_task_rq_fair: the last LP if idle, else the first idle LP after it, else the last
        LP (a first run: the least loaded LP, the lowest-numbered among equals)."""
        prev = entity.lp
        idle = self.idle_lps
        if prev is not None and prev in idle:
            return prev
        if idle:
            n = self.n_lps
            start = 0 if prev is None else prev + 1
            for k in range(start, start + n):
                if k % n in idle:
                    return k % n
        if prev is not None:
            return prev
        return min(range(self.n_lps), key=self.runnable_on)

    def _shift(self, entity, src: int, dst: int, queued_at_src: bool = False) -> None:
        """migrate_task_rq_fair: keep ``entity``'s virtual runtime relative to its queue."""
        if src == dst:
            return
        self.migrations += 1
        a, b = self.rqs[src], self.rqs[dst]
        if self.sched.kind == "eevdf":
            delta = b.avg_vruntime() - a.avg_vruntime()
        else:
            delta = b.update_min_vruntime() - a.update_min_vruntime()
        entity.vruntime_us += delta
        entity.deadline_us += delta

    def acquire(self, entity, woken: bool = False):
        """Run ``entity`` on the LP select_task_rq_fair chooses, or queue it there (returns the event
        that fires at its dispatch, as Host.acquire)."""
        prev = entity.lp
        if woken or prev is None:
            lp = self._select_lp(entity)
            if prev is not None:
                self._shift(entity, prev, lp)
        else:  # preempted or yielded: it stays on its queue (no select_task_rq without a wakeup)
            lp = prev
        ev = self.rqs[lp].acquire(entity, woken)
        if ev is None:
            self.idle_lps.discard(lp)
        else:
            self._queued_on[entity] = lp
            if self.idle_lps:  # the nohz kick: idle LPs balance once someone can move
                self._kick_idle_lps()
        return ev

    def release(self, entity) -> None:
        lp = entity.lp
        self._left_at[entity] = self.env.now
        rq = self.rqs[lp]
        rq.release(entity)
        if not rq.running:
            self.idle_lps.add(lp)
            self._newidle(lp)

    # ------------------------------------------------------------ balancing
    def _busiest(self, than: int):
        """find_busiest_queue: the LP with the most runnable entities and someone waiting, if it has
        more than ``than``."""
        best, best_n, best_lp = None, than, 0
        rqs = self.rqs
        for lp in self.waiting_lps:
            rq = rqs[lp]
            n = len(rq._queue) + len(rq.running)
            if n > best_n or n == best_n and best is not None and lp < best_lp:
                best, best_n, best_lp = rq, n, lp
        return best

    def _cold(self, rq, count: int) -> list:
        """detach_tasks' candidates on ``rq``: up to ``count`` waiting entities, least recently run
        first, that are not cache hot."""
        now, left = self.env.now, self._left_at
        order = sorted(rq._queue, key=lambda item: left.get(item[2], -math.inf))
        out = []
        for item in order:
            if left.get(item[2], -math.inf) + MIGRATION_COST_US <= now:  # as _kick_idle computes it
                out.append(item[2])
                if len(out) == count:
                    break
        return out

    def _take(self, rq, entity) -> None:
        for i, item in enumerate(rq._queue):
            if item[2] is entity:
                rq._unqueue(i)
                return
        raise AssertionError("the entity is not waiting in that queue")

    def _newidle(self, lp: int) -> None:
        """newidle_balance for ``lp``, about to idle: pull one cold waiting entity from the busiest
        queue and run it; if all are hot, try again when the first turns cold."""
        src = self._busiest(1)
        if src is None:
            return
        cold = self._cold(src, 1)
        if not cold:
            self._kick_idle(lp, src)
            return
        entity = cold[0]
        self._take(src, entity)
        self._shift(entity, src.lp_id, lp)
        del self._queued_on[entity]
        dst = self.rqs[lp]
        dst._idle_set.discard(lp)
        self.idle_lps.discard(lp)
        self.newidle_pulls += 1
        dst._dispatch_waiting(entity, lp)
        if self.idle_lps and self.waiting_lps:  # others may still wait with LPs idle
            self._kick_idle_lps()

    def _kick_idle_lps(self) -> None:
        """Every idle LP with no balance pending balances when the first waiting entity turns cold."""
        due = self._retry_due
        for lp in sorted(self.idle_lps):
            if due[lp] == math.inf:
                self._kick_idle(lp)

    def _kick_idle(self, lp: int, src=None) -> None:
        """Balance idle ``lp`` again when the first waiting entity of the busiest queue turns cold
        (the idle LP's own balance or the nohz kick, at the earliest moment either could succeed)."""
        src = src or self._busiest(1)
        if src is None:
            return
        left = self._left_at
        first = min(left.get(item[2], -math.inf) for item in src._queue) + MIGRATION_COST_US
        first = max(first, self.env.now)
        if first < self._retry_due[lp]:
            self._retry_due[lp] = first
            self.env.timeout(first - self.env.now).callbacks.append(partial(self._retry, lp=lp, due=first))

    def _retry(self, _event, lp: int, due: float) -> None:
        if self._retry_due[lp] != due:
            return
        self._retry_due[lp] = math.inf
        if lp in self.idle_lps:
            self.idle_kicks += 1
            self._newidle(lp)

    def balance_tick(self) -> None:
        """Periodic load balancing at a slice's end: every LP whose balance interval has passed pulls
        half the imbalance (in runnable entities) from the busiest queue, cold entities only."""
        now = self.env.now
        if now < self._next_due:
            return
        self._next_due = math.inf
        for lp in range(self.n_lps):
            if self._next_balance[lp] > now:
                self._next_due = min(self._next_due, self._next_balance[lp])
                continue
            self._next_balance[lp] = now + self.balance_interval_us
            self._next_due = min(self._next_due, now + self.balance_interval_us)
            mine = self.runnable_on(lp)
            src = self._busiest(mine + 1)
            if src is None:
                continue
            moving = (len(src._queue) + len(src.running) - mine) // 2
            for entity in self._cold(src, moving):
                self._take(src, entity)
                self._shift(entity, src.lp_id, lp)
                self.balance_pulls += 1
                dst = self.rqs[lp]
                if lp in self.idle_lps:
                    del self._queued_on[entity]
                    dst._idle_set.discard(lp)
                    self.idle_lps.discard(lp)
                    dst._dispatch_waiting(entity, lp)
                else:
                    self._queued_on[entity] = lp
                    dst._enqueue(entity)
                    dst._arm()

    # ------------------------------------------------------------ directed yield
    def yield_to(self, yielder, target) -> int:
        """yield_to() across per-LP queues (see the module's docstring); the outcomes of Host.yield_to."""
        if not Host.can_yield_to(target):
            self._yield_failures += 1
            return YIELD_FAILED
        self._yields += 1
        own = self.rqs[yielder.lp]
        t_lp = self._queued_on[target]
        if t_lp == yielder.lp:  # Host.yield_to on that queue (it counts yields_to_target)
            outcome = own.yield_to(yielder, target)
        else:
            self._resched_for(self.rqs[t_lp], target)
            outcome = self._yield_own(own, yielder)
        if outcome == YIELD_LEFT_LP:
            self._left_at[yielder] = self.env.now
        return outcome

    def _resched_for(self, rq, target) -> None:
        """resched_curr(p_rq) with ``target`` as its next buddy: preempt the LP's running entity if
        the pick would now run another (CFS: the buddy if within the wakeup granularity of the
        leftmost, else the leftmost; EEVDF: pick_eevdf)."""
        assert rq.running, "an idle LP holds no waiting entity"
        curr = next(iter(rq.running))
        rq.yield_target = target  # counted in directed_yields_to_target if the LP's next pick runs it
        if self.sched.kind != "eevdf":
            rq.next_buddy = target  # yield_to_task_fair's set_next_buddy, whatever follows
        if curr.preempt_pending:
            return
        if self.sched.kind == "eevdf":
            v_now = rq.vruntime_now(curr)
            rq._renew_deadline(curr, v_now)
            big_v = rq.avg_vruntime()
            if v_now <= big_v + 1e-9 + abs(big_v) * 1e-12:
                return  # RUN_TO_PARITY: pick_eevdf keeps an eligible running entity within its slice
            saved, curr.vruntime_us = curr.vruntime_us, v_now
            i, _ = rq._best(also=curr)
            curr.vruntime_us = saved
            if i < 0:
                return
        else:
            leftmost = rq.leftmost_other(curr)
            near = target.vruntime_us - rq.vruntime_now(leftmost) <= self.sched.buddy_granularity_us
            chosen = target if near else leftmost
            if chosen is curr:
                return
        self.yield_reschedules += 1
        curr.preempt()

    def _yield_own(self, rq, yielder) -> int:
        """yield_task_fair on the yielder's own queue, then schedule(): another entity of that queue
        runs, or the yielder again."""
        if not rq._queue:
            return YIELD_KEPT_LP
        if not rq._yield_task(yielder):
            return YIELD_KEPT_LP
        yielder.descheduled_runnable()
        lp = rq._put_prev(yielder)
        rq._dispatch_waiting(rq._pick(), lp)
        return YIELD_LEFT_LP
