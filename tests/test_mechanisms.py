"""The fidelity mechanisms (issue 12), each against what it must do: exact
values where the scenario is deterministic (quiet_config: no exits), bounds
with replications where it is not. Invariant checks are on in every run."""

import math

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_config, quiet_config
from tlbsim import Config, simulate
from tlbsim.hv import HvCallCode
from tlbsim.model.accounting import TIME_COLUMNS

C = Config().costs
SPIN = Config().spin
ONE = dict(partition__vps=8, workload__initiators=[0], workload__rate_per_ms=0.05, partition__duration_us=100_000.0)
MORE = dict(workload__rate_per_ms=0.2)  # about 20 shootdowns


# ------------------------------------------------------------ spinning that yields
def ple_exits(spin_us: float, window: float) -> tuple[int, float]:
    """Pause-loop exits while spinning ``spin_us`` from a PLE window of ``window``: each exit costs
    the round trip plus yield_cost_us and grows the window by ple_window_grow (grow_ple_window);
    the ack can only end a window that is spinning. Returns the exits and the window after them:
    the window is the VP's (vmx->ple_window) and carries over to its next spin until it is
    scheduled out."""
    t, exits = 0.0, 0
    cost = C.vmexit_roundtrip_us + SPIN.yield_cost_us
    while t + window < spin_us:
        t += window + cost
        exits += 1
        window = min(window * SPIN.ple_window_grow, SPIN.ple_window_max_us)
    return exits, window


def test_pause_loop_exits_follow_the_vps_own_growing_window():
    # kvm profile, 1:1, the last target's Canceled exit made long: the initiator spins ~20 us
    canceled = 20.0
    res = simulate(quiet_config(workload__policy="ipi", partition__semantics="kvm", **{**ONE, **MORE},
                                exits__canceled__cost_us=canceled, partition__apic_emulation="user"), seed=1)
    sd = res.shootdowns
    spin_us = canceled + C.local_flush_cost_us(1)  # the last IPI lands when the sends end
    # never descheduled (1:1, no halts): the window grows on and later spins exit less, then never
    window, expected = SPIN.ple_window_us, []
    for _ in range(len(sd)):
        exits, window = ple_exits(spin_us, window)
        expected.append(exits)
    assert expected[:3] == [3, 1, 0] and len(sd) > 3
    assert res.vps.spin_exits.sum() == sum(expected)
    assert res.summary["directed_yields"] == 0  # 1:1: nobody waits for an LP


def test_the_ple_window_shrinks_back_when_the_vp_is_scheduled_in():
    """With halts (the VP leaves its LP and is loaded again) the window goes back to the base
    (shrink_ple_window, ple_window_shrink 0): spins after a halt exit as the first spin did."""
    canceled = 20.0
    kw = dict(workload__policy="ipi", partition__semantics="kvm", **{**ONE, **MORE}, exits__canceled__cost_us=canceled,
              partition__apic_emulation="user", guest__lazy_tlb="off")  # every target gets its IPI: a long spin
    never = simulate(quiet_config(**kw), seed=1)
    halting = simulate(quiet_config(**kw, exits__x64_halt__rate_per_ms=50.0), seed=1)
    per_sd_never = never.vps.spin_exits.sum() / len(never.shootdowns)
    per_sd_halting = halting.vps.spin_exits.sum() / len(halting.shootdowns)
    assert per_sd_never < 1.0 < per_sd_halting <= 3.0


def test_long_spin_wait_notification_only_after_the_retries():
    window = SPIN.notify_retries * SPIN.spin_iteration_us
    user = dict(workload__policy="ipi", partition__apic_emulation="user", **ONE)  # the Canceled exit sets the spin
    short = simulate(quiet_config(exits__canceled__cost_us=window / 2, **user), seed=1)
    long = simulate(quiet_config(exits__canceled__cost_us=window * 1.5, **user), seed=1)
    assert short.vps.spin_exits.sum() == 0
    assert long.vps.spin_exits.sum() == len(long.shootdowns)  # one notification per shootdown
    # HvCallNotifyLongSpinWait is handled by the hypervisor: no exit reaches the stack for it
    assert long.exits[long.exits.reason == "HYPERCALL"]["count"].sum() == 0


def test_directed_yield_hands_the_lp_to_a_waiting_target():
    """8 VPs on 4 LPs, IPIs: without yielding a spinner keeps its LP until its slice ends; with the
    notification it hands the LP to a descheduled VP, and the spin time falls."""
    kw = dict(partition__vps=8, partition__lps=4, workload__policy="ipi", partition__duration_us=60_000.0)
    off = [simulate(make_config(spin__mode="off", **kw), seed=s) for s in range(3)]
    on = [simulate(make_config(**kw), seed=s) for s in range(3)]
    assert sum(r.summary["directed_yields"] for r in off) == 0
    assert all(r.summary["directed_yields"] > 0 for r in on)
    spin_off = np.mean([r.summary["spinning_us"] for r in off])
    spin_on = np.mean([r.summary["spinning_us"] for r in on])
    assert spin_on < spin_off / 3
    work_off = np.mean([r.summary["guest_work_fraction"] for r in off])
    work_on = np.mean([r.summary["guest_work_fraction"] for r in on])
    assert work_on > 1.5 * work_off


def test_pv_sched_yield_is_a_kvm_guest_option():
    # CFS host: a successful KVM_HC_SCHED_YIELD moves the sender off its LP when its LP's queue holds
    # another entity (under EEVDF a yield whose pick is the yielder changes nothing)
    kw = dict(partition__vps=8, partition__lps=4, workload__policy="ipi", partition__duration_us=40_000.0,
              partition__semantics="kvm", host__scheduler="cfs")
    on = simulate(make_config(**kw), seed=2)
    off = simulate(make_config(guest__pv_sched_yield="off", **kw), seed=2)
    tlfs_kw = {**kw, "partition__semantics": "tlfs", "host__scheduler": "profile"}
    tlfs = simulate(make_config(**tlfs_kw), seed=2)
    # KVM_HC_SCHED_YIELD: a hypercall the hypervisor handles, once per send with a preempted target
    hc = {name: r.vps.sched_yield_hypercalls.sum() for name, r in (("on", on), ("off", off), ("tlfs", tlfs))}
    assert on.exits[on.exits.reason == "HYPERCALL"]["count"].sum() == 0  # no exit to the stack
    # (with per-LP run queues the PV yields replace pause-loop-exit yields rather than add to them: seed 2
    # gives 4,370 directed yields with it and 5,675 without, so their count is not asserted)
    assert hc["on"] > hc["off"] == 0 and hc["tlfs"] == 0
    # with pause-loop exits already yielding within microseconds, it changes little: one seed's run is too
    # noisy to say (0.29-0.42 of the time is work at seeds 2-7, either way), six seeds' means agree within 15 %
    work = {k: np.mean([simulate(make_config(**kw, **extra), seed=s).summary["guest_work_fraction"]
                        for s in range(2, 8)]) for k, extra in (("on", {}), ("off", {"guest__pv_sched_yield": "off"}))}
    assert 0.85 < work["on"] / work["off"] < 1.15, work
    # on Hyper-V every directed yield comes from a spin exit (no PV sched yield); the yielder leaves its LP
    # (a spin yield) unless it is alone on its LP's queue (per-LP run queues: it keeps spinning there)
    assert tlfs.summary["directed_yields"] > 0
    assert 0 < tlfs.vps.spin_yields.sum() <= tlfs.summary["directed_yields"] <= tlfs.vps.spin_exits.sum()
    off_tlfs = simulate(make_config(guest__pv_sched_yield="off", **tlfs_kw), seed=2)
    assert hc["tlfs"] == off_tlfs.vps.sched_yield_hypercalls.sum() == 0  # auto: not on Hyper-V


# ------------------------------------------------------------ co-tenants
def test_cpu_bound_cotenants_take_their_share_of_the_lps():
    # 8 VPs + 8 CPU-bound co-tenant VPs on 8 LPs: the partition's VPs run about half the time
    res = simulate(make_config(partition__vps=8, partition__lps=8, host__cotenants=1, host__cotenant_vps=8,
                               workload__rate_per_ms=0.1, partition__duration_us=200_000.0,
                               partition__slice_us=3000.0), seed=1)
    v = res.vps
    on_lp = 1 - (v.descheduled_us.sum() + v.halted_us.sum()) / (8 * 200_000.0)
    assert 0.40 < on_lp < 0.60, on_lp
    cotenant_share = res.summary["cotenant_run_us"] / (8 * 200_000.0)
    assert 0.40 < cotenant_share < 0.60
    # nobody idles: the LPs are always busy
    assert on_lp + cotenant_share == pytest.approx(1.0, abs=0.05)


def test_cotenants_change_no_draw_of_the_partition():
    kw = dict(partition__vps=4, partition__lps=4, workload__policy="mask", partition__duration_us=30_000.0)
    alone = simulate(make_config(**kw), seed=4).shootdowns
    shared = simulate(make_config(host__cotenants=2, host__cotenant_vps=4, **kw), seed=4).shootdowns
    # open loop: the same arrivals, whatever the LPs are busy with
    assert same_arrivals(alone, shared) > 50


def same_arrivals(*tables) -> int:
    """Check that each VP's recorded arrivals are prefixes of one sequence; return how many are common."""
    common = 0
    for vp in sorted(set(tables[0].initiator_vp)):
        seqs = [sorted(t.arrival_us[t.initiator_vp == vp]) for t in tables]
        n = min(len(q) for q in seqs)
        for q in seqs[1:]:
            assert q[:n] == seqs[0][:n], vp
        common += n
    return common


# ------------------------------------------------------------ workload modes
def test_open_loop_arrivals_are_common_to_every_policy():
    kw = dict(partition__vps=8, partition__lps=4, partition__duration_us=30_000.0)
    tables = []
    for policy in ("ipi", "mask", "kvm-pv"):
        sd = simulate(make_config(workload__policy=policy, **kw), seed=3).shootdowns
        assert (sd.queue_us >= 0).all()
        started = sd[sd.status != "QUEUED"]
        np.testing.assert_allclose(started.queue_us, started.issue_us - started.arrival_us)
        tables.append(sd)
    # each VP's arrivals are the same sequence for every policy (each served a prefix of it)
    assert same_arrivals(*tables) > 50
    # under overcommit, requests queue while their VP is off its LP
    assert simulate(make_config(workload__policy="ipi", **kw), seed=3).summary["queue_mean_us"] > 0


def test_closed_loop_throughput_is_work_plus_shootdown():
    work = 200.0
    res = simulate(quiet_config(workload__policy="mask", workload__mode="closed", workload__closed_work_us=work,
                                workload__closed_work_distribution="fixed", **ONE), seed=0)
    sd = res.shootdowns
    latency = sd.latency_us.iloc[0]
    np.testing.assert_allclose(sd.latency_us, latency)
    # each cycle: the useful work, the shootdown, and the refill of the one entry it removed
    cycle = work + latency + C.refill_us
    expected_ops = ONE["partition__duration_us"] / cycle
    assert abs(len(sd) - expected_ops) <= 1
    assert res.summary["ops_per_s"] == pytest.approx(len(sd) / (ONE["partition__duration_us"] * 1e-6))
    assert (sd.queue_us == 0).all()


# ------------------------------------------------------------ List calls and ALL_PROCESSORS
def test_list_calls_remove_what_the_range_names_not_the_working_set():
    kw = dict(partition__vps=16, workload__rate_per_ms=0.5, partition__duration_us=30_000.0)
    listed = simulate(make_config(workload__policy="mask", **kw), seed=1).summary
    space = simulate(make_config(workload__policy="mask", guest__call_form="space", **kw), seed=1).summary
    assert listed["refill_us"] < space["refill_us"] / 20
    assert listed["guest_work_fraction"] > space["guest_work_fraction"] + 0.1


# ------------------------------------------------------------ VTL1 and lock waits
def test_vtl1_time_and_no_vtl0_interrupts_meanwhile():
    rate, hold = 2.0, 50.0
    res = simulate(make_config(partition__vps=4, locks__vsm_rate_per_ms=rate, locks__vsm_hold_mean_us=hold,
                               locks__vsm_hold_distribution="fixed", workload__policy="ipi",
                               partition__duration_us=100_000.0), seed=2)
    v = res.vps
    # entries per ms of guest time, each a fixed hold
    expected = rate / 1000.0 * v.guest_us * hold
    np.testing.assert_allclose(v.vtl1_us, expected, rtol=0.25)
    # an IPI to a VP in VTL1 waits for its return: some IPI shootdowns take about a hold
    assert res.shootdowns.latency_us.max() > hold * 0.5


def _lock_storm(wait: str, seed: int):
    return simulate(make_config(partition__vps=8, workload__policy="mask", locks__vsm_rate_per_ms=10.0,
                                locks__vsm_hold_mean_us=60.0, locks__wait=wait, workload__rate_per_ms=1.0,
                                partition__duration_us=30_000.0), seed=seed)


def test_reissue_can_starve_snapshot_cannot():
    reissue = [_lock_storm("reissue", s) for s in range(3)]
    snapshot = [_lock_storm("snapshot", s) for s in range(3)]
    assert sum(r.summary["shootdowns_resuspended"] for r in reissue) > 0
    for r in snapshot:
        sd = r.shootdowns
        assert r.summary["shootdowns_resuspended"] == 0 and sd.suspensions.max() <= 1
        assert (sd.reissues == 0).all()
    # waiting only for the holders at call time is never slower in the tail
    p99 = {name: np.mean([r.summary["latency_p99_us"] for r in runs]) for name, runs in
           (("reissue", reissue), ("snapshot", snapshot))}
    assert p99["snapshot"] <= p99["reissue"]


def test_openhcl_profile_waits_by_snapshot():
    a = simulate(make_config(partition__semantics="openhcl", partition__vps=8, locks__vsm_rate_per_ms=10.0,
                             locks__vsm_hold_mean_us=60.0, workload__rate_per_ms=1.0,
                             partition__duration_us=30_000.0), seed=1)
    b = simulate(make_config(partition__semantics="openhcl", partition__vps=8, locks__vsm_rate_per_ms=10.0,
                             locks__vsm_hold_mean_us=60.0, workload__rate_per_ms=1.0, locks__wait="snapshot",
                             partition__duration_us=30_000.0), seed=1)
    assert a.summary["suspensions"] > 0 and (a.shootdowns.reissues == 0).all()
    assert a.shootdowns.suspensions.max() <= 1
    pd.testing.assert_series_equal(a.shootdowns.latency_us, b.shootdowns.latency_us)


def test_short_locks_are_waited_for_on_the_lp():
    kw = dict(partition__vps=8, locks__vsm_rate_per_ms=5.0, locks__vsm_hold_mean_us=20.0,
              partition__duration_us=30_000.0)
    give_up = simulate(make_config(**kw), seed=1).summary
    keep = simulate(make_config(locks__wait_spin_us=1e6, **kw), seed=1).summary
    assert give_up["suspensions"] > 0 and keep["suspensions"] > 0
    # keeping the LP: no dispatch after a suspension
    assert keep["dispatches"] < give_up["dispatches"]


# ------------------------------------------------------------ KVM's flush queue
def test_kvm_flush_queue_overflow_becomes_a_full_flush():
    # 4 VPs on 1 LP, page flushes: a descheduled VP collects more than 16 deferred range flushes
    kw = dict(partition__vps=4, partition__lps=1, workload__policy="mask", workload__rate_per_ms=5.0,
              partition__duration_us=40_000.0, partition__slice_us=3000.0, tlb__retention_tau_us=math.inf)
    cfs = {k: v for k, v in kw.items() if k != "partition__slice_us"}  # the kvm profile's CFS sets its own slices
    kvm = simulate(make_config(partition__semantics="kvm", **cfs), seed=1)
    tlfs = simulate(make_config(**kw), seed=1)
    # with page-exact deferred flushes, each removes about one entry; an overflow removes everything
    per_deferred = {name: r.vps.refill_entries.sum() / max(1, r.vps.deferred_applied.sum())
                    for name, r in (("kvm", kvm), ("tlfs", tlfs))}
    assert per_deferred["kvm"] > 5 * per_deferred["tlfs"]


# ------------------------------------------------------------ TLB contents across descheduling
def test_eviction_follows_the_foreign_time_on_the_lp():
    """Two VPs alternate on one LP in 100 us slices (no exits, no shootdowns): each return finds the
    other's 100 us on the LP, so a VP keeps exp(-100 / tau) of its full TLB, tau = capacity / fill
    rate. Each VP refills in its slice (20 entries a us), so every return evicts the same amount: 8
    returns in 1 ms (the first dispatch of each evicts nothing)."""
    kw = dict(partition__vps=2, partition__lps=1, partition__slice_us=100.0, partition__duration_us=1000.0,
              workload__rate_per_ms=1e-9)
    res = simulate(quiet_config(**kw), seed=1)
    t = Config().tlb
    tau = t.capacity / t.fill_rate_per_us
    full = t.working_set_pages + t.global_pages  # both fit the capacity: the caps are the page counts
    assert res.summary["evicted_entries"] == pytest.approx(8 * full * (1 - math.exp(-100.0 / tau)), rel=1e-9)
    assert simulate(quiet_config(tlb__retention_tau_us=50.0, **kw), seed=1).summary["evicted_entries"] == (
        pytest.approx(8 * full * (1 - math.exp(-100.0 / 50.0)), rel=1e-9))
    assert simulate(quiet_config(tlb__retention_tau_us=math.inf, **kw), seed=1).summary["evicted_entries"] == 0
    # 1:1: every VP returns to its own LP, which ran nothing else meanwhile: nothing is evicted
    alone = simulate(make_config(partition__vps=8, partition__lps=8, partition__duration_us=30_000.0), seed=1)
    assert alone.summary["evicted_entries"] == 0
    # overcommitted: evictions, and a deferred flush is not charged for entries already gone
    over = dict(partition__vps=8, partition__lps=4, workload__policy="mask", partition__duration_us=30_000.0)
    kept = simulate(make_config(tlb__retention_tau_us=math.inf, **over), seed=1)
    evicted = simulate(make_config(**over), seed=1)
    assert kept.summary["evicted_entries"] == 0 and evicted.summary["evicted_entries"] > 0
    assert evicted.vps.refill_entries.sum() < kept.vps.refill_entries.sum()


# ------------------------------------------------------------ lazy TLB
def test_lazy_tlb_skips_idle_vps():
    kw = dict(partition__vps=8, workload__policy="ipi", exits__x64_halt__rate_per_ms=2.0,
              exits__halt_idle_mean_us=500.0, partition__duration_us=40_000.0)
    lazy = simulate(make_config(guest__lazy_tlb="on", **kw), seed=1)
    eager = simulate(make_config(guest__lazy_tlb="off", **kw), seed=1)
    assert lazy.shootdowns.deferred_targets.sum() > 0 and eager.shootdowns.deferred_targets.sum() == 0
    assert lazy.shootdowns.ipis.sum() < eager.shootdowns.ipis.sum()
    assert lazy.summary["latency_p50_us"] <= eager.summary["latency_p50_us"]
    # the flushes they missed are applied when they run again
    assert lazy.vps.deferred_applied.sum() > 0


# ------------------------------------------------------------ defects
def test_page_flush_removes_pages_times_the_cached_share_of_the_working_set():
    from tlbsim.model.tlb import FlushScope, Tlb

    tlb = Tlb(0x1000, capacity=512, working_set=2048, global_pages=0, fill_rate_per_us=1.0, warm=True)
    assert tlb.nonglobal == 512  # a quarter of the working set is cached
    required, removed = tlb.flush(FlushScope(0x1000, True, 8))
    assert required == removed == pytest.approx(8 * 512 / 2048)


def test_ipi_fallback_after_a_denied_hypercall_is_a_success_with_the_calls_status():
    res = simulate(quiet_config(workload__policy="linux", run__inject_fault="deny_hypercalls", **ONE), seed=1)
    sd = res.shootdowns
    assert (sd.status == "SUCCESS").all() and (sd.hypercall_status == "ACCESS_DENIED").all()
    assert (sd.ipis == 7).all() and res.summary["shootdowns_failed"] == 0
    mask = simulate(quiet_config(workload__policy="mask", run__inject_fault="deny_hypercalls", **ONE), seed=1)
    assert (mask.shootdowns.status == "ACCESS_DENIED").all()


def test_linux_ex_gva_limit_is_508_minus_the_banks():
    from tlbsim.model.guest import LINUX_MAX_GVAS_EX
    from tlbsim.model.partition import Partition
    from tlbsim.model.tlb import FlushScope

    assert LINUX_MAX_GVAS_EX == 508
    units = 4096  # pages per GVA range entry
    part = Partition(quiet_config(partition__vps=130, workload__policy="linux",
                                  costs__flush_ceiling_pages=units * 600, workload__sharing="groups",
                                  workload__group_size=129), 0)
    vp = part.vps[0]
    targets = part.targets_of(vp, vp.address_space)
    banks = 3  # VP 128 is in bank 2: Linux sends banks 0..2
    fits = part.policy.build(vp, None, FlushScope(vp.address_space, True, (508 - banks) * units), targets)[0]
    over = part.policy.build(vp, None, FlushScope(vp.address_space, True, (508 - banks + 1) * units), targets)[0]
    assert fits.call_code == HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST_EX
    assert over.call_code == HvCallCode.FLUSH_VIRTUAL_ADDRESS_SPACE_EX


def test_deferred_flushes_pending_at_the_end_are_reported():
    res = simulate(make_config(partition__vps=8, partition__lps=3, workload__policy="mask",
                               partition__duration_us=20_000.0), seed=3)
    pending = res.summary["deferred_pending"]
    assert pending == res.shootdowns.deferred_targets.sum() - res.vps.deferred_applied.sum()
    assert pending > 0


def test_a_run_past_2_pow_24_us_ends():
    # a float clock cannot advance by 1e-9 us beyond 2^24 us: budgets compare with a clock-relative tolerance
    quiet = {f"exits__{name}__rate_per_ms": 0.0 for name in Config().exits.specs()}
    cfg = make_config(partition__vps=2, workload__rate_per_ms=0.005, **{**quiet,
                      "exits__memory_access__rate_per_ms": 0.02}, partition__duration_us=60e6)
    res = simulate(cfg, seed=1)
    assert res.summary["shootdowns_completed"] > 300
    assert math.isclose(res.vps[[f"{c}_us" for c in TIME_COLUMNS]].sum(axis=1).iloc[0], 60e6, rel_tol=1e-9)


# ------------------------------------------------------------ IPI paths that save SimPy events
#: Where the event-saving IPI paths are checked against the events they replace: dedicated,
#: overcommitted with IPI-aware spinning, co-tenants, KVM with PV sched yield, closed loops.
IPI_CONFIGS = [
    ("ipi", {}),
    ("ipi", dict(partition__vps=24, partition__lps=12, spin__ipi_aware=True)),
    ("ipi", dict(host__cotenants=2, host__cotenant_vps=8, partition__slice_us=500.0)),
    ("kvm-pv", dict(partition__semantics="kvm", partition__vps=24, partition__lps=12, guest__pv_sched_yield="on")),
    ("kvm-pv", dict(workload__mode="closed", workload__closed_work_us=100.0)),
    ("ipi", dict(workload__mode="closed", workload__closed_work_us=100.0)),
]


def ipi_config(policy, overrides):
    return make_config(workload__policy=policy, partition__duration_us=20_000.0, **overrides)


def assert_same_results(a, b) -> None:
    """Every table and summary figure but the event count, bit for bit."""
    for name in ("shootdowns", "vps", "exits"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert a.summary.drop("events").equals(b.summary.drop("events"))


@pytest.mark.parametrize("policy,overrides", IPI_CONFIGS)
def test_ipi_wake_in_the_delivery_matches_simpys_interruption(monkeypatch, policy, overrides):
    """vp.wake_for_ipi resumes an IPI's target inside the delivery's callback instead of through a
    SimPy Interruption event: every table and summary figure must be what the Interruption path
    gives, bit for bit, with fewer events (one per woken target)."""
    from tlbsim.model import guest

    fast = simulate(ipi_config(policy, overrides), seed=11)
    monkeypatch.setattr(guest, "wake_for_ipi", lambda vp: vp.proc.interrupt())
    slow = simulate(ipi_config(policy, overrides), seed=11)
    assert_same_results(fast, slow)
    assert len(fast.shootdowns) > 20
    assert fast.summary["events"] < slow.summary["events"]


@pytest.mark.parametrize("policy,overrides", [
    *IPI_CONFIGS,
    # KVM's PLE window (1.64 us) against a 20-page handler: windows that end before the acks are due
    ("ipi", dict(partition__semantics="kvm", workload__pages=20)),
])
def test_no_spin_window_timer_when_every_ack_is_due_first(monkeypatch, policy, overrides):
    """A spinner whose pending acks all come from handlers under way, each ending before the spin
    window would, sets no window timer (guest.AckWait.acked_before): that timer would have found
    the VP done spinning. With the timer set every time again, every table and summary figure must
    be the same bit for bit, and the run must take exactly one event more per timer skipped."""
    from tlbsim.model import guest

    answers = []
    real = guest.AckWait.acked_before

    def counted(self, time_us):
        answers.append(real(self, time_us))
        return answers[-1]

    monkeypatch.setattr(guest.AckWait, "acked_before", counted)
    lean = simulate(ipi_config(policy, overrides), seed=11)
    skips = sum(answers)
    monkeypatch.setattr(guest.AckWait, "acked_before", lambda self, t: False)
    timers = simulate(ipi_config(policy, overrides), seed=11)
    assert_same_results(lean, timers)
    assert skips > 0 and not all(answers)  # both branches taken
    assert timers.summary["events"] - lean.summary["events"] == skips


@pytest.mark.parametrize("policy,overrides", IPI_CONFIGS)
def test_last_ipi_delivery_rides_on_the_senders_timeout(monkeypatch, policy, overrides):
    """guest._sent puts the IPI delivery due when the send ends on the sender's own timeout. With
    the delivery a timeout of its own again, scheduled just before the sender's (as before), every
    table and summary figure must be the same bit for bit, and the run must take exactly one event
    more per IPI send."""
    from tlbsim.model import guest

    def separate(env, send_us, deliver):
        env.timeout(send_us).callbacks.append(deliver)
        return env.timeout(send_us)

    merged = simulate(ipi_config(policy, overrides), seed=11)
    sends = []
    monkeypatch.setattr(guest, "_sent", lambda env, us, deliver: sends.append(us) or separate(env, us, deliver))
    apart = simulate(ipi_config(policy, overrides), seed=11)
    assert_same_results(merged, apart)
    assert len(sends) > 20
    assert apart.summary["events"] - merged.summary["events"] == len(sends)


# ------------------------------------------------------------ guest load (issue 21)
def test_vps_without_a_thread_idle_and_are_in_no_active_set():
    """8 VPs, 3 threads: VPs 3..7 run no guest code, issue nothing and are nobody's target; an IPI
    shootdown names exactly the 2 other threads' VPs."""
    res = simulate(make_config(partition__vps=8, workload__threads=3, workload__policy="ipi", guest__lazy_tlb="off",
                               partition__duration_us=30_000.0), seed=1)
    v, sd = res.vps.set_index("vp"), res.shootdowns
    assert len(sd) > 20
    assert set(sd.initiator_vp) <= {0, 1, 2}
    assert (sd.ipis == 2).all() and (sd.n_targets == 2).all()
    idle = v.loc[3:7]
    assert (idle.guest_us == 0).all() and (idle.flushes_applied == 0).all()
    assert (idle.halted_us > 0.99 * 30_000.0).all()


def test_a_thread_that_sleeps_halts_its_vp_between_operations():
    kw = dict(partition__vps=4, workload__mode="closed", workload__closed_work_us=200.0, workload__policy="mask",
              partition__duration_us=40_000.0)
    awake = simulate(make_config(**kw), seed=2).summary
    sleepy = simulate(make_config(workload__sleep_us=200.0, **kw), seed=2)
    v = sleepy.vps
    # about half the time asleep (200 us of work, 200 us of sleep): halted, and fewer operations
    assert 0.35 < v.halted_us.sum() / (4 * 40_000.0) < 0.6
    assert sleepy.summary["ops_per_s"] < 0.7 * awake["ops_per_s"]


def test_guest_system_time_counts_spinning_and_the_kernel_share_of_work():
    res = simulate(make_config(partition__vps=8, workload__policy="ipi", partition__duration_us=20_000.0), seed=1)
    s, v, x = res.summary, res.vps, res.exits
    canceled = x[x.reason == "CANCELED"].time_us.sum()
    expected = (Config().guest.kernel_fraction * v.guest_us.sum() + v.spinning_us.sum() + v.spin_exit_us.sum()
                + v.ipi_send_us.sum() + v.flush_us.sum() + canceled + v.ipi_interrupt_us.sum() + v.sched_yield_us.sum()
                + v.hypercall_us.sum())
    assert s["guest_system_us"] == pytest.approx(expected, rel=1e-12)
    assert s["guest_system_us"] > v.spinning_us.sum() > 0


def test_directed_yield_candidates_follow_the_kernel_version():
    """KVM at 4:1: the 5.3+ rule (ready VPs, user-mode ones with an interrupt pending) finds a
    candidate for more pause-loop exits than the older rule (preempted VPs in kernel mode only),
    so the older one spins more; both yield only to VPs that wait for an LP."""
    kw = dict(partition__vps=32, partition__lps=8, partition__semantics="kvm", workload__policy="ipi",
              guest__pv_sched_yield="off", partition__duration_us=30_000.0)
    new = [simulate(make_config(**kw), seed=s).summary for s in range(2)]
    old = [simulate(make_config(spin__candidates="preempted", **kw), seed=s).summary for s in range(2)]
    share = [sum(r["directed_yields"] for r in rs) / sum(r["spin_exits"] for r in rs) for rs in (new, old)]
    assert share[0] > share[1]
    assert sum(r["spinning_us"] for r in old) > sum(r["spinning_us"] for r in new)


# ------------------------------------------------------------ guest partitions (issue 21)
def test_guests_are_one_key_with_a_partition_column_everywhere():
    res = simulate(make_config(partition__vps=4, partition__lps=8, host__guests=3, host__guest_policies=["ipi", "all"],
                               partition__duration_us=20_000.0), seed=1)
    assert sorted(set(res.shootdowns.partition)) == [0, 1, 2]
    assert list(res.vps.partition) == [0] * 4 + [1] * 4 + [2] * 4
    assert set(res.exits.partition) == {0, 1, 2}
    p = res.partitions.set_index("partition")
    assert list(p.policy) == ["mask", "ipi", "all"]
    for g in range(3):
        assert p.loc[g, "shootdowns_completed"] == ((res.shootdowns.partition == g)
                                                    & (res.shootdowns.status == "SUCCESS")).sum()
    assert p.shootdowns_completed.sum() == res.summary["shootdowns_completed"]
    assert res.summary["guest_partitions"] == 3
    # a shootdown targets VPs of its own partition only: IPIs name the 3 others
    ipi = res.shootdowns[res.shootdowns.partition == 1]
    assert (ipi.ipis <= 3).all() and (ipi.ipis == 3).any()


def test_adding_a_guest_changes_no_draw_of_the_first():
    """With an LP for every VP the guests never meet: guest 0's table is the single guest's, bit for bit."""
    kw = dict(partition__vps=6, partition__lps=12, partition__duration_us=20_000.0)
    alone = simulate(make_config(**kw), seed=3).shootdowns
    two = simulate(make_config(host__guests=2, **kw), seed=3).shootdowns
    first = two[two.partition == 0].reset_index(drop=True).drop(columns="id")
    pd.testing.assert_frame_equal(first, alone.drop(columns="id"), check_categorical=False)
    other = two[two.partition == 1]
    assert len(other) > 20 and not np.array_equal(other.arrival_us.to_numpy()[:20], first.arrival_us.to_numpy()[:20])


def test_identical_guests_share_the_lps():
    # two 8-VP guests, CPU-bound closed loops, on 8 LPs: each runs about half the time
    res = simulate(make_config(partition__vps=8, partition__lps=8, host__guests=2, workload__mode="closed",
                               workload__closed_work_us=500.0, partition__duration_us=100_000.0,
                               exits__x64_halt__rate_per_ms=0.0), seed=1)
    v = res.vps
    on_lp = 1 - (v.descheduled_us + v.halted_us + v.suspended_us) / 100_000.0
    share = on_lp.groupby(v.partition).mean()
    assert 0.40 < share[0] < 0.60 and 0.40 < share[1] < 0.60
    assert share.sum() == pytest.approx(1.0, abs=0.05)


def test_vps_without_a_thread_do_not_make_the_host_overcommitted():
    from tlbsim.model.partition import Partition

    part = Partition(make_config(partition__vps=16, partition__lps=8, workload__threads=8), 0)
    assert part.host.entities == 8 and not part.host.overcommitted
