"""Per-LP run queues (model/runqueues.py) against hand-worked schedules: select_task_rq_fair's wakeup
placement, newidle and periodic balancing with cache-hot entities kept, migrate_task_rq_fair's
virtual-runtime shift, and yield_to across queues (kernel/sched/fair.c, core.c, topology.c). Every
figure is worked out by hand from those rules; the schedules are deterministic."""

import simpy

from tests.test_host import CFS, Entity
from tlbsim.model.host import YIELD_KEPT_LP, SchedParams, make_host
from tlbsim.model.runqueues import BUSY_FACTOR, MIGRATION_COST_US, PerLpHost


def per_lp(n_lps, sched=CFS):
    env = simpy.Environment()
    host = make_host(env, n_lps, sched, "per_lp")
    assert isinstance(host, PerLpHost)
    return env, host


def at(env, t, fn):
    def proc():
        yield env.timeout(t)
        fn()
    env.process(proc())


def test_a_woken_entity_takes_its_last_lp_if_idle_else_the_first_idle_after_it_else_waits_there():
    env, host = per_lp(3)
    Entity(env, host, "a", lp=0)
    b = Entity(env, host, "b", start=100.0, woken=True, lp=1)
    c = Entity(env, host, "c", start=200.0, woken=True, lp=0)  # LP 0 busy, LP 1 busy: LP 2
    d = Entity(env, host, "d", start=300.0, woken=True, lp=1)  # all busy: waits on its last LP, 1
    seen = {}
    at(env, 400.0, lambda: seen.update(b=b.lp, c=c.lp, q=[host.runnable_on(k) for k in range(3)]))
    env.run(until=500.0)
    assert seen == {"b": 1, "c": 2, "q": [1, 2, 1]}
    assert d.log == []  # still waiting behind b


def test_an_lp_about_to_idle_pulls_the_least_recently_run_waiting_entity():
    env, host = per_lp(2)
    a = Entity(env, host, "a", lp=0)
    Entity(env, host, "d", busy=1000.0, lp=1)
    b = Entity(env, host, "b", lp=0)
    c = Entity(env, host, "c", lp=0)
    env.run(until=10_000.0)
    # t=1000: d ends; LP 1 pulls b (never ran: cold; first in LP 0's queue) and runs it from then on
    assert b.log[0] == ("on", 1000.0) and b.lp == 1 and host.newidle_pulls == 1
    # LP 0: three runnable until 1000 (slices of 2 ms), two after: a's slice is re-read, 3 ms
    assert a.log[:2] == [("on", 0.0), ("off", 3000.0)] and c.log[0] == ("on", 3000.0)


def test_a_cache_hot_entity_is_not_pulled_until_it_turns_cold():
    env, host = per_lp(2)
    a = Entity(env, host, "a", lp=0)
    Entity(env, host, "d", busy=3200.0, lp=1)
    b = Entity(env, host, "b", lp=0)
    env.run(until=5000.0)
    # LP 0: a 0-3000 (two runnable: 3 ms), then b. LP 1 idles at 3200; a left at 3000, hot until 3500
    assert a.log == [("on", 0.0), ("off", 3000.0), ("on", 3000.0 + MIGRATION_COST_US)]
    assert a.lp == 1 and b.log == [("on", 3000.0)] and host.idle_kicks == 1


def test_the_shared_queue_would_have_run_it_at_once():
    env = simpy.Environment()
    host = make_host(env, 2, CFS)
    a = Entity(env, host, "a", lp=0)
    d = Entity(env, host, "d", busy=3200.0, lp=1)
    Entity(env, host, "b", lp=0)
    env.run(until=5000.0)
    # one queue for both LPs: d's slice (3 ms: three entities on two LPs) ends at 3000 too, and its
    # LP runs the least-run waiting entity, a, at once
    assert a.log == [("on", 0.0), ("off", 3000.0), ("on", 3000.0)] and d.log[1] == ("off", 3000.0)


def test_every_idle_lp_balances_when_entities_queue_elsewhere():
    env, host = per_lp(3)
    a = Entity(env, host, "a", lp=0)
    b = Entity(env, host, "b", lp=0)
    c = Entity(env, host, "c", lp=0)
    env.run(until=10.0)
    # b and c queue on LP 0 (their last LP, not woken) while LPs 1 and 2 idle; both LPs balance at once
    # (b and c never ran: cold) and each pulls one, b first (the first in LP 0's queue)
    assert (a.lp, b.lp, c.lp) == (0, 1, 2) and b.log == [("on", 0.0)] and c.log == [("on", 0.0)]
    assert host.newidle_pulls == 2 and host.free_lps == 0


def test_periodic_balancing_pulls_half_the_imbalance_after_the_busy_interval():
    env, host = per_lp(2)
    assert host.balance_interval_us == 2 * 1000.0 * BUSY_FACTOR  # sd_weight ms x busy_factor
    Entity(env, host, "a", lp=0)
    d = Entity(env, host, "d", lp=1)
    b = Entity(env, host, "b", lp=0)
    Entity(env, host, "c", lp=0)
    env.run(until=31_999.0)
    assert host.balance_pulls == 0 and [host.runnable_on(k) for k in (0, 1)] == [3, 1]
    env.run(until=40_000.0)
    # LP 0 rotates a, b, c in 2 ms slices; at its slice end at 32,000 LP 1 balances: (3 - 1) // 2 = 1
    # entity, the least recently run waiting one: b (left at 28,000; c at 30,000). LP 1 then has two
    # runnable and d has run its 3 ms slice long ago: b runs at once.
    assert host.balance_pulls == 1 and ("on", 32_000.0) in b.log and b.lp == 1
    assert ("off", 32_000.0) in d.log


def test_a_migrating_entity_keeps_its_virtual_runtime_relative_to_the_queue():
    env, host = per_lp(2)
    Entity(env, host, "a", lp=0, vruntime=5000.0)
    e = Entity(env, host, "e", lp=0, vruntime=5200.0)
    Entity(env, host, "d", busy=100.0, lp=1, vruntime=100.0)
    env.run(until=50.0)
    v0 = host.rqs[0].update_min_vruntime()
    env.run(until=150.0)
    # at 100 LP 1 idles (its min_vruntime 200: d's runtime at its end) and pulls e, 200 ahead of
    # LP 0's min_vruntime (5,000 + 100 of a's running)
    assert e.lp == 1 and e.log[0] == ("on", 100.0)
    assert v0 == 5050.0
    assert e.vruntime_us == 5200.0 - 5100.0 + 200.0


def test_a_directed_yield_to_another_lps_entity_reschedules_that_lp_and_keeps_a_lone_yielder():
    env, host = per_lp(2)
    y = Entity(env, host, "y", lp=0)
    c = Entity(env, host, "c", lp=1)
    t = Entity(env, host, "t", lp=1)
    out = []
    at(env, 100.0, lambda: out.append(host.yield_to(y, t)))
    env.run(until=200.0)
    # the target becomes LP 1's next buddy: c (vruntime 100) is rescheduled, t (0) runs; y is alone
    # on LP 0, so yield_task_fair changes nothing and it keeps its LP
    assert out == [YIELD_KEPT_LP] and t.log == [("on", 100.0)] and c.log == [("on", 0.0), ("off", 100.0)]
    assert y.log == [("on", 0.0)]
    assert host.yields == 1 and host.yields_to_target == 1 and host.yield_reschedules == 1


def test_a_target_far_ahead_is_not_run_the_leftmost_is():
    env, host = per_lp(2)
    y = Entity(env, host, "y", lp=0)
    c = Entity(env, host, "c", lp=1, vruntime=50_000.0)
    t = Entity(env, host, "t", lp=1, vruntime=40_000.0)
    out = []
    at(env, 100.0, lambda: out.append(host.yield_to(y, t)))
    env.run(until=200.0)
    # LP 1's leftmost is c? no: c runs at 50,100, t waits at 40,000 -> t is the leftmost and runs
    assert t.log == [("on", 100.0)] and c.log[-1] == ("off", 100.0)
    env2, host2 = per_lp(2)
    y2 = Entity(env2, host2, "y", lp=0)
    Entity(env2, host2, "c", lp=1, vruntime=0.0)
    t2 = Entity(env2, host2, "t", lp=1, vruntime=40_000.0)
    at(env2, 100.0, lambda: out.append(host2.yield_to(y2, t2)))
    env2.run(until=200.0)
    # here the running c (100) is the leftmost and t is 39,900 beyond the wakeup granularity: no change
    assert t2.log == [] and host2.yields_to_target == 0 and host2.yield_reschedules == 0


def test_eevdf_per_lp_queues_keep_their_own_average():
    env, host = per_lp(2, SchedParams.eevdf(1, 3000.0))
    a = Entity(env, host, "a", lp=0)
    b = Entity(env, host, "b", lp=0)
    Entity(env, host, "c", lp=1)
    env.run(until=9000.0)
    # LP 0 alternates a and b by virtual deadlines a slice apart; LP 1 runs c alone
    assert a.log[:2] == [("on", 0.0), ("off", 3000.0)] and b.log[0] == ("on", 3000.0)
    assert host.rqs[1].avg_vruntime() == 9000.0


# ------------------------------------------------------------ in the whole model
import pytest  # noqa: E402

from tests.conftest import make_config  # noqa: E402
from tlbsim.runner import simulate  # noqa: E402


@pytest.mark.parametrize(("semantics", "scheduler", "extra"), [
    ("kvm", "eevdf", {"workload.policy": "kvm-pv"}),
    ("kvm", "cfs", {"workload.policy": "linux", "host.cotenants": 1, "host.cotenant_vps": 4}),
    ("tlfs", "hyperv", {"host.guests": 2, "workload.threads": 6}),
])
def test_per_lp_queues_run_the_model_with_every_invariant_and_deterministically(semantics, scheduler, extra):
    cfg = make_config(**{"partition.semantics": semantics, "host.scheduler": scheduler, "host.runqueues": "per_lp",
                         "partition.vps": 8, "partition.lps": 3, "partition.duration_us": 30_000.0, **extra})
    one, two = simulate(cfg, seed=3), simulate(cfg, seed=3)
    assert one.shootdowns.equals(two.shootdowns) and one.vps.equals(two.vps)
    s = one.summary
    assert s["dispatches"] > 0 and s["lp_migrations"] >= s["newidle_pulls"] + s["balance_pulls"]


def test_sleeping_threads_leave_lps_idle_and_wakeups_move_to_them():
    cfg = make_config(**{"partition.semantics": "kvm", "host.scheduler": "cfs", "host.runqueues": "per_lp",
                         "workload.mode": "closed", "workload.sleep_us": 2000.0, "workload.policy": "linux",
                         "partition.vps": 8, "partition.lps": 4, "partition.duration_us": 30_000.0})
    s = simulate(cfg, seed=1).summary
    assert s["lp_migrations"] > 0 and s["dispatches"] > 0
