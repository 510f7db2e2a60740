"""The host scheduler (model/host.py) against hand-worked schedules: Linux's fair class as
kernel/sched/fair.c and kernel/sched/core.c define it (sched_slice, update_min_vruntime,
place_entity, check_preempt_wakeup, yield_to), and the hyperv scheduler's fixed slice. Every
figure below is worked out by hand from those rules; the schedules are deterministic."""

import math

import pytest
import simpy
from simpy import Interrupt

from tlbsim.model.host import (
    YIELD_FAILED,
    YIELD_KEPT_LP,
    YIELD_LEFT_LP,
    CoTenantVp,
    EevdfHost,
    SchedParams,
    Schedulable,
    make_host,
    tunable_scaling,
)

# a small CFS: 6 ms latency, 0.75 ms minimum granularity, 1 ms wakeup granularity (Linux's normalised
# defaults, unscaled)
CFS = SchedParams.cfs(1, 6000.0, 750.0, 1000.0)


class Entity(Schedulable):
    """A runnable thing for the host: sleeps until ``start``, then needs ``busy`` us of LP time,
    preempted whenever the host says so; logs when it gets and leaves an LP."""

    def __init__(self, env, host, name, start=0.0, busy=math.inf, woken=False, vruntime=0.0, lp=None, then=None):
        self.env, self.host, self.name = env, host, name
        self.on_lp = False
        self.preempt_pending = False
        self.dispatch_event = None
        self.vruntime_us = vruntime
        self.dispatched_us = 0.0
        self.lp = lp
        self.deadline_us = 0.0
        self.vlag_us = 0.0
        self.interruptible = False
        self.log = []
        host.entities += 1
        self.then = then  # (sleep_us, busy_us): after its work, sleep, then work again (woken)
        self.proc = env.process(self._run(start, busy, woken))

    def kick(self):
        if self.interruptible:
            self.interruptible = False
            self.proc.interrupt()

    def _run(self, start, busy, woken):
        yield from self._work(start, busy, woken)
        if self.then is not None:
            yield from self._work(self.then[0], self.then[1], True)

    def _work(self, start, busy, woken):
        env, host = self.env, self.host
        yield env.timeout(start)
        while busy > 0:
            ev = host.acquire(self, woken)
            woken = False
            if ev is not None:
                yield ev
            self.log.append(("on", env.now))
            t = env.now
            self.interruptible = True
            try:
                yield env.timeout(busy)
                busy = 0.0
            except Interrupt:
                busy -= env.now - t
            self.interruptible = False
            host.release(self)
            self.log.append(("off", env.now))


def host_of(n_lps=1, sched=CFS):
    env = simpy.Environment()
    return env, make_host(env, n_lps, sched)


# ------------------------------------------------------------ tunables and slices
@pytest.mark.parametrize(("lps", "factor"), [(1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (12, 4), (4096, 4)])
def test_tunables_scale_with_one_plus_ilog2_of_at_most_eight_lps(lps, factor):
    assert tunable_scaling(lps) == factor
    p = SchedParams.cfs(lps)
    assert (p.latency_us, p.min_granularity_us, p.wakeup_granularity_us) == (6000.0 * factor, 750.0 * factor,
                                                                           1000.0 * factor)
    assert p.sleeper_credit_us == p.latency_us / 2  # GENTLE_FAIR_SLEEPERS


@pytest.mark.parametrize(("nr", "slice_us"), [(1, 6000.0), (2, 3000.0), (3, 2000.0), (8, 750.0), (9, 750.0),
                                              (16, 750.0)])
def test_sched_slice_is_the_period_shared_with_a_minimum_granularity(nr, slice_us):
    # period = max(latency, nr x min_granularity); an equal share of it each
    assert CFS.slice_for(nr) == slice_us


def test_hyperv_slice_is_fixed():
    assert SchedParams.hyperv(10_000.0).slice_for(5) == 10_000.0


# ------------------------------------------------------------ hand-worked schedules
def test_two_cpu_bound_entities_alternate_in_half_periods():
    env, host = host_of()
    a, b = Entity(env, host, "a"), Entity(env, host, "b")
    env.run(until=10_000.0)
    # nr_running 2: slices of 3 ms; a 0-3000, b 3000-6000, a 6000-9000, b from 9000
    assert a.log == [("on", 0.0), ("off", 3000.0), ("on", 6000.0), ("off", 9000.0)]
    assert b.log == [("on", 3000.0), ("off", 6000.0), ("on", 9000.0)]
    assert host.preemptions == 3 and host.dispatches == 4


def test_three_entities_share_by_virtual_runtime():
    env, host = host_of()
    es = [Entity(env, host, n) for n in "abc"]
    env.run(until=6000.0)
    # slices of 2 ms, in order of arrival (equal virtual runtimes)
    assert [e.log[0][1] for e in es] == [0.0, 2000.0, 4000.0]


def test_min_vruntime_follows_the_least_run_and_never_goes_back():
    env, host = host_of()
    Entity(env, host, "a")
    seen = []

    def probe():
        for _ in range(4):
            yield env.timeout(1000.0)
            seen.append(host.update_min_vruntime())

    env.process(probe())
    env.run(until=4500.0)
    assert seen == [1000.0, 2000.0, 3000.0, 4000.0]  # the running entity's virtual runtime


def test_a_woken_sleeper_is_placed_half_a_latency_behind_and_preempts():
    env, host = host_of()
    a = Entity(env, host, "a")
    w = Entity(env, host, "w", start=5000.0, busy=500.0, woken=True, lp=0)
    env.run(until=20_000.0)
    # at 5000: min_vruntime 5000, w placed at 5000 - 3000 = 2000; a is ahead by 3000 > 1000: preempted
    assert host.wakeup_preemptions == 1
    assert w.log == [("on", 5000.0), ("off", 5500.0)]
    assert a.log[:3] == [("on", 0.0), ("off", 5000.0), ("on", 5500.0)]
    assert w.vruntime_us == 2500.0


def test_a_sleeper_ahead_keeps_its_virtual_runtime_and_does_not_preempt():
    env, host = host_of()
    a = Entity(env, host, "a")
    w = Entity(env, host, "w", start=5000.0, busy=500.0, woken=True, vruntime=4500.0, lp=0)
    env.run(until=20_000.0)
    # a at 5000 is ahead by only 500 < 1000: no preemption; w waits for a's 3 ms slice (nr 2)
    assert host.wakeup_preemptions == 0
    assert w.log[0] == ("on", 5000.0)
    assert a.log[1] == ("off", 5000.0)  # a has run 5000 > 3000 when w queues: the slice is over at once


def test_hyperv_has_no_wakeup_preemption_and_a_fixed_slice():
    env, host = host_of(sched=SchedParams.hyperv(10_000.0))
    a = Entity(env, host, "a")
    w = Entity(env, host, "w", start=5000.0, busy=500.0, woken=True, lp=0)
    env.run(until=20_000.0)
    assert host.wakeup_preemptions == 0
    assert a.log[:2] == [("on", 0.0), ("off", 10_000.0)]
    assert w.log == [("on", 10_000.0), ("off", 10_500.0)]


def test_an_idle_lp_is_taken_first_and_preferably_the_last_one():
    env, host = host_of(n_lps=4)
    e = Entity(env, host, "e", busy=10.0, lp=2)
    env.run(until=20.0)
    assert e.lp == 2 and host.free_lps == 4


# ------------------------------------------------------------ yield_to
class Stub(Schedulable):
    """An entity the test moves by hand (no process)."""

    def __init__(self, host, vruntime=0.0):
        self.on_lp = False
        self.preempt_pending = False
        self.dispatch_event = None
        self.vruntime_us = vruntime
        self.dispatched_us = 0.0
        self.lp = None
        self.deadline_us = 0.0
        self.vlag_us = 0.0
        self.kicks = 0
        host.entities += 1

    def kick(self):
        self.kicks += 1

    def descheduled_runnable(self):
        self.told_descheduled = True


def test_yield_to_fails_on_a_running_or_sleeping_target():
    env, host = host_of(n_lps=2)
    y, running = Stub(host), Stub(host)
    host.acquire(y)
    host.acquire(running)
    sleeping = Stub(host)
    assert not host.can_yield_to(running) and not host.can_yield_to(sleeping)
    assert host.yield_to(y, running) == YIELD_FAILED and host.yield_to(y, sleeping) == YIELD_FAILED
    assert y.on_lp and host.yield_failures == 2 and host.yields == 0


def test_yield_to_runs_the_target_when_that_is_fair():
    env, host = host_of()
    y = Stub(host)
    host.acquire(y)
    other = Stub(host, vruntime=100.0)
    target = Stub(host, vruntime=900.0)  # within 1000 of the leftmost (other)
    host.acquire(other)
    host.acquire(target)
    assert host.yield_to(y, target) == YIELD_LEFT_LP and y.told_descheduled
    assert target.on_lp and not y.on_lp and not other.on_lp
    assert host.queue == [other] and host.yields_to_target == 1


def test_yield_to_runs_the_leftmost_when_the_target_is_too_far_ahead():
    env, host = host_of()
    y = Stub(host)
    host.acquire(y)
    other = Stub(host, vruntime=100.0)
    target = Stub(host, vruntime=1200.0)  # 1100 ahead of the leftmost: the next buddy is not picked
    host.acquire(other)
    host.acquire(target)
    assert host.yield_to(y, target) == YIELD_LEFT_LP and y.told_descheduled
    assert other.on_lp and not target.on_lp and not y.on_lp
    assert host.yields == 1 and host.yields_to_target == 0


def test_cotenants_share_one_lp_by_slices():
    env, host = host_of()
    streams = [None, None]
    cts = [CoTenantVp(env, host, s, "cpu", 1.0, 1.0) for s in streams]
    env.run(until=12_000.0)
    assert host.preemptions == 3  # at 3000, 6000, 9000
    assert [c.run_us for c in cts] == [6000.0, 3000.0]


# ------------------------------------------------------------ EEVDF (Linux 6.6+)
EEVDF = SchedParams.eevdf(1, 3000.0)


def test_eevdf_base_slice_scales_like_the_other_tunables():
    assert SchedParams.eevdf(1).latency_us == 750.0 and SchedParams.eevdf(12).latency_us == 3000.0
    env, host = host_of(sched=EEVDF)
    assert isinstance(host, EevdfHost) and not isinstance(host_of()[1], EevdfHost)


def test_eevdf_two_cpu_bound_entities_alternate_in_base_slices():
    # a: deadline 3000; at 3000 V = 1500, b eligible with the earlier deadline (3000 < 6000): b runs;
    # at 6000 both at 3000 with deadlines 6000: the waiting one wins the tie (curr only if strictly earlier)
    env, host = host_of(sched=EEVDF)
    a, b = Entity(env, host, "a"), Entity(env, host, "b")
    env.run(until=10_000.0)
    assert a.log == [("on", 0.0), ("off", 3000.0), ("on", 6000.0), ("off", 9000.0)]
    assert b.log == [("on", 3000.0), ("off", 6000.0), ("on", 9000.0)]


def test_eevdf_slices_do_not_shrink_with_load():
    # CFS would give 4 entities 1.5 ms each of a 6 ms period; EEVDF gives each its 3 ms base slice
    env, host = host_of(sched=EEVDF)
    es = [Entity(env, host, n) for n in "abcd"]
    env.run(until=12_000.0)
    assert [e.log[0][1] for e in es] == [0.0, 3000.0, 6000.0, 9000.0]


def test_eevdf_keeps_a_sleepers_lag_and_an_eligible_runner_its_slice():
    env, host = host_of(sched=EEVDF)
    a = Entity(env, host, "a")
    w = Entity(env, host, "w", start=5000.0, busy=500.0, woken=True, lp=0)
    env.run(until=20_000.0)
    # w never ran (lag 0): placed at V = 5000 with deadline 8000. a (v 5000, eligible, deadline renewed
    # to 6000 at 3000) keeps its slice (RUN_TO_PARITY): no wakeup preemption; at 6000 a is past V
    assert host.wakeup_preemptions == 0
    assert a.log[:2] == [("on", 0.0), ("off", 6000.0)]
    assert w.log == [("on", 6000.0), ("off", 6500.0)]


def test_eevdf_wakeup_preempts_an_ineligible_runner():
    env, host = host_of(sched=EEVDF)
    a = Entity(env, host, "a")
    b = Entity(env, host, "b", busy=1000.0, then=(500.0, 100.0))
    env.run(until=20_000.0)
    # 0-3000 a; 3000-4000 b, which sleeps at v 1000 with V = (3000 + 1000) / 2: lag 1000; a runs from 4000.
    # At 4500 b wakes: lag 1000 x (1 + 1) / 1 = 2000 behind V = 3500: v 1500, deadline 4500. Now
    # V = 2500, a (3500) is no longer eligible and b's deadline is earlier than a's (6000): a is preempted
    assert host.wakeup_preemptions == 1
    assert b.log == [("on", 3000.0), ("off", 4000.0), ("on", 4500.0), ("off", 4600.0)]
    assert a.log[2:5] == [("on", 4000.0), ("off", 4500.0), ("on", 4600.0)]


def test_eevdf_directed_yield_ignores_the_buddy():
    env, host = host_of(sched=EEVDF)
    y = Stub(host)
    host.acquire(y)
    other, target = Stub(host, vruntime=0.0), Stub(host, vruntime=0.0)
    other.deadline_us, target.deadline_us = 3100.0, 5000.0  # both eligible; other's deadline is earlier
    host.acquire(other)
    host.acquire(target)
    assert host.yield_to(y, target) == YIELD_LEFT_LP
    assert other.on_lp and not target.on_lp and host.yields_to_target == 0


def test_eevdf_yield_changes_nothing_when_the_yielder_is_still_the_pick():
    env, host = host_of(sched=EEVDF)
    y = Stub(host)
    host.acquire(y)
    y.deadline_us = 100.0
    target = Stub(host, vruntime=50_000.0)  # far ahead of V: not eligible
    target.deadline_us = 53_000.0
    host.acquire(target)
    assert host.can_yield_to(target) and host.yield_to(y, target) == YIELD_KEPT_LP
    assert y.on_lp and not target.on_lp and host.yields == 1
    assert y.deadline_us == 3100.0  # yield_task_fair moved its deadline a slice on


def test_a_cotenant_preempted_before_it_resumes_gives_the_lp_back():
    """Review finding: a co-tenant dispatched by a release and preempted by a wakeup in the same instant
    (before its process resumed, so the kick found it not interruptible) must still leave its LP."""
    env, host = host_of()
    x = Stub(host)
    host.acquire(x)
    cotenant = CoTenantVp(env, host, None, "cpu", 1.0, 1.0)
    env.run(until=1.0)  # the co-tenant queues behind x
    cotenant.vruntime_us = 10_000.0  # far ahead: a woken x preempts it

    def switch():
        yield env.timeout(99.0)
        host.release(x)  # the co-tenant is dispatched ...
        host.acquire(x, woken=True)  # ... and x, woken at once, preempts it (placed at 10,000 - 3,000)
        assert cotenant.preempt_pending and not cotenant.interruptible

    env.process(switch())
    env.run(until=200.0)
    assert x.on_lp and not cotenant.on_lp and cotenant.run_us == 0.0
    assert host.wakeup_preemptions == 1


def test_eevdf_slices_end_at_large_simulated_times():
    """Slices keep their length at large clock values (deadlines are also renewed in wall time: in virtual
    time alone a renewal could round short of the slice end and re-arm the timer at the same instant)."""
    env = simpy.Environment(initial_time=1e8)
    host = make_host(env, 1, EEVDF)
    a, b = Entity(env, host, "a", vruntime=5e6), Entity(env, host, "b", vruntime=5e6)
    env.run(until=1e8 + 30_000.0)
    assert len(a.log) + len(b.log) == 19  # 10 slices of 3 ms, alternating (b still runs the last)
    assert all(t2 - t1 == pytest.approx(3000.0) for (_, t1), (_, t2) in zip(a.log[::2], a.log[1::2], strict=True))
