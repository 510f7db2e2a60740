"""The SimPy model against closed forms, statistics and the behaviours
shared/reference/calibration.md says it must show. Invariant checks are on
in every run here (conftest.make_config)."""

import math

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_config, quiet_config
from tlbsim import simulate
from tlbsim.hv import HvCallCode
from tlbsim.model.partition import InvariantError

# One initiator (VP 0), 8 VPs sharing one address space, no exits: every
# target is running guest code whenever VP 0 shoots down.
BASE = dict(partition__vps=8, workload__initiators=[0], workload__rate_per_ms=0.05, partition__duration_us=200_000.0)


def latencies(policy, **kw):
    res = simulate(quiet_config(workload__policy=policy, **{**BASE, **kw}), seed=3)
    sd = res.shootdowns
    assert len(sd) > 3 and (sd.status == "SUCCESS").all()
    return sd


@pytest.mark.parametrize(
    "policy,expected_us",
    [
        # local flush 0.28, then exit+decode 0.7, mask walk 7 x 0.02, 7 running targets x 1.0
        ("mask", 0.28 + 0.6 + 0.1 + 7 * 0.02 + 7 * 1.0),
        # local 0.28, exit+decode 0.7, ALL broadcast 1.5, 7 x 0.25 acks
        ("all", 0.28 + 0.6 + 0.1 + 1.5 + 7 * 0.25),
        # all 8 VPs share the mm -> ALL_PROCESSORS, 1 page -> List call: + 1 range 0.05 + 1 INVLPG 0.08
        ("linux", 0.28 + 0.6 + 0.1 + 1.5 + 7 * 0.25 + 0.05 + 0.08),
        # local 0.28, 7 trapped ICR writes x 2.5; the last target takes a Canceled exit (1.0) and flushes (0.28)
        ("ipi", 0.28 + 7 * 2.5 + 1.0 + 0.28),
        # local 0.28, one PV send-IPI hypercall 0.6 + 7 x 1.0, then Canceled exit 1.0 + flush 0.28 on each target
        ("kvm-pv", 0.28 + 0.6 + 7 * 1.0 + 1.0 + 0.28),
    ],
)
def test_latency_with_k_running_targets_is_the_closed_form(policy, expected_us):
    sd = latencies(policy)
    np.testing.assert_allclose(sd.latency_us, expected_us, rtol=0, atol=1e-9)
    assert (sd.n_targets == 7).all()


@pytest.mark.parametrize(
    "policy,events",
    [
        # the arrival (the initiator's guest interval ends), the local flush, the hypercall
        ("mask", 3), ("all", 3), ("linux", 3),
        # initiator: arrival, local flush, the 7 trapped ICR writes, one delivery per target, the last ack;
        # each of the 7 targets: the interrupt, its Canceled exit and handler (one timeout), resuming guest code
        ("ipi", 3 + 7 + 1 + 7 * 3),
        # initiator: arrival, local flush, the PV send-IPI hypercall, one delivery to all, the last ack
        ("kvm-pv", 3 + 1 + 1 + 7 * 3),
    ],
)
def test_simpy_events_per_shootdown(policy, events):
    """Hypervisor flushes cost no event per target; IPIs cost three per target."""
    from tlbsim.model.partition import simulate_records

    cfg = quiet_config(workload__policy=policy, **BASE)
    with_sd = simulate_records(cfg, 3)
    idle = simulate_records(cfg.with_overrides({"workload.rate_per_ms": 0.0}), 3)
    n = len(with_sd.shootdowns["id"])
    assert n > 3
    assert with_sd.events - idle.events == events * n


def test_state_switch_in_the_past_moves_time_exactly():
    """VP._switch_at (the Canceled exit and the IPI handlers share one
    timeout): the time after the switch belongs to the new state, even if
    the VP was settled after that moment."""
    from tlbsim.model.partition import Partition
    from tlbsim.model.vp import EXIT, FLUSH

    vp = Partition(quiet_config(partition__vps=2), 0).vps[0]
    vp.state, vp.since, vp.acc[EXIT], vp.acc[FLUSH] = EXIT, 0.0, 0.0, 0.0
    vp._switch_at(FLUSH, 2.0)
    assert (vp.state, vp.since, vp.acc[EXIT], vp.acc[FLUSH]) == (FLUSH, 2.0, 2.0, 0.0)
    vp.state, vp.since, vp.acc[EXIT] = EXIT, 5.0, 5.0  # settled at 5 us while in the exit
    vp._switch_at(FLUSH, 2.0)
    assert (vp.state, vp.since, vp.acc[EXIT], vp.acc[FLUSH]) == (FLUSH, 5.0, 2.0, 3.0)


def test_call_codes_and_flags_per_policy():
    assert (latencies("mask").call_code == HvCallCode.FLUSH_VIRTUAL_ADDRESS_SPACE).all()
    assert (latencies("mask")["flags"] == 0x4).all()  # NON_GLOBAL_MAPPINGS_ONLY
    assert (latencies("all")["flags"] == 0x5).all()  # + ALL_PROCESSORS
    linux = latencies("linux")
    assert (linux.call_code == HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST).all() and (linux["flags"] == 0x1).all()
    whole = latencies("linux", workload__pages=64)  # above the 33-page ceiling: whole mm, NON_GLOBAL
    assert (whole.call_code == HvCallCode.FLUSH_VIRTUAL_ADDRESS_SPACE).all() and (whole["flags"] == 0x5).all()
    assert (latencies("ipi").call_code == 0).all() and (latencies("ipi").ipis == 7).all()


def test_ex_call_when_a_target_index_is_64_or_more():
    sd = latencies("mask", partition__vps=130, partition__lps=130, workload__sharing="groups",
                   workload__group_size=130, workload__rate_per_ms=0.5, partition__duration_us=20_000.0)
    assert (sd.call_code == HvCallCode.FLUSH_VIRTUAL_ADDRESS_SPACE_EX).all()
    # 129 targets named in 3 banks: exit+decode, walk 129 x 0.02, 3 bank words x 0.05, 129 running x 1.0
    np.testing.assert_allclose(sd.latency_us, 0.28 + 0.7 + 129 * 0.02 + 3 * 0.05 + 129 * 1.0, atol=1e-9)


def test_no_hypercall_without_targets():
    sd = latencies("mask", workload__sharing="private")
    assert (sd.call_code == 0).all() and (sd.n_targets == 0).all()
    np.testing.assert_allclose(sd.latency_us, 0.28, atol=1e-12)


def test_same_config_and_seed_give_identical_frames():
    c = make_config(workload__policy="linux", partition__lps=6, locks__vsm_rate_per_ms=0.5)
    a, b = simulate(c, seed=11), simulate(c, seed=11)
    for name in ("shootdowns", "vps", "exits"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    pd.testing.assert_series_equal(a.summary, b.summary)
    assert not simulate(c, seed=12).shootdowns.equals(a.shootdowns)


def test_time_by_state_sums_to_the_duration():
    c = make_config(partition__lps=5, workload__policy="ipi", partition__duration_us=50_000.0)
    vps = simulate(c, seed=2).vps
    total = vps.filter(like="_us").sum(axis=1)
    np.testing.assert_allclose(total, 50_000.0, rtol=1e-12)
    assert (vps.descheduled_us > 0).all()  # 8 VPs on 5 LPs: everyone waits sometimes


def test_exits_are_counted_per_reason():
    res = simulate(make_config(partition__duration_us=200_000.0), seed=4)
    ex = res.exits.groupby("reason")["count"].sum()
    # MemoryAccess and IoPort share a rate (0.5/ms of guest time): counts agree within noise
    assert ex["MEMORY_ACCESS"] > 500 and abs(ex["MEMORY_ACCESS"] - ex["X64_IO_PORT_ACCESS"]) < 0.2 * ex["MEMORY_ACCESS"]
    t = res.exits.groupby("reason")["time_us"].sum()
    assert t["MEMORY_ACCESS"] == pytest.approx(8.0 * ex["MEMORY_ACCESS"])


def test_flush_removes_entries_and_costs_refills():
    # Warm TLBs hold the whole working set (1024 non-global + 256 global fit in 1536 entries).
    # mask: the initiator's own 1-page flush removes 1 entry; each of the 7 targets loses its 1024
    # non-global entries to the hypervisor's whole-address-space flush.
    whole = latencies("mask")
    assert whole.refill_entries.iloc[0] == pytest.approx(1 + 7 * 1024)
    # linux: a 1-page List call removes one entry on each of the 8 VPs
    assert latencies("linux").refill_entries.iloc[0] == pytest.approx(8.0)
    # each removed entry is one refill of 0.036 us, repaid from guest time
    res = simulate(quiet_config(workload__policy="mask", **BASE), seed=3)
    assert res.vps.refill_us.sum() == pytest.approx(res.vps.refill_entries.sum() * 0.036, rel=1e-6)


def test_mean_suspension_matches_exponential_residual_life():
    """VSM TlbLocked on VP 1 only, exponential holds of mean h, gaps of mean g.
    A Poisson-arriving call sees the lock held with probability h / (h + g)
    (PASTA). It pays exit+decode (d = 0.7 us) before suspending, so the time
    suspended is max(0, R - d) with R ~ Exp(h) (memoryless residual life):
    mean h * exp(-d / h)."""
    h, g, d = 40.0, 160.0, 0.7
    rows = []
    for seed in range(30):
        c = quiet_config(partition__vps=2, workload__initiators=[0], workload__rate_per_ms=1.0,
                         locks__vsm_rate_per_ms=1000.0 / g, locks__vsm_hold_mean_us=h, locks__vsm_vps=[1],
                         partition__duration_us=100_000.0)
        rows.append(simulate(c, seed=seed).shootdowns)
    sd = pd.concat(rows)
    hit = sd[sd.suspensions > 0]
    p = len(hit) / len(sd)
    se_p = math.sqrt(p * (1 - p) / len(sd))
    assert abs(p - h / (h + g)) < 3.5 * se_p  # ~99.95 % two-sided
    first = hit.suspended_us / hit.suspensions
    mean, se = first.mean(), first.std(ddof=1) / math.sqrt(len(first))
    assert abs(mean - h * math.exp(-d / h)) < 3.5 * se
    assert (hit.reissues == hit.suspensions).all()


def test_memory_access_emulation_inhibits_flushes():
    c = make_config(partition__vps=4, workload__rate_per_ms=2.0, exits__memory_access__rate_per_ms=20.0)
    sd = simulate(c, seed=1).shootdowns
    assert sd.suspensions.sum() > 0
    c2 = c.with_overrides({"locks.memory_access_inhibit": False})
    assert simulate(c2, seed=1).shootdowns.suspensions.sum() == 0


def test_a_lock_that_never_lifts_is_reported_not_hung():
    c = quiet_config(partition__vps=2, workload__initiators=[0], workload__rate_per_ms=1.0,
                     locks__vsm_rate_per_ms=1.0, locks__vsm_hold_mean_us=math.inf,
                     locks__vsm_hold_distribution="fixed", locks__vsm_vps=[1])
    res = simulate(c, seed=0)
    stuck = res.shootdowns[res.shootdowns.status == "INCOMPLETE"]
    assert len(stuck) == 1 and stuck.stuck_on.iloc[0] == "lock that never lifts"
    assert res.summary["shootdowns_incomplete"] == 1


def test_deferred_targets_are_flushed_at_their_next_entry():
    # 4 VPs on 2 LPs: descheduled targets are deferred, not waited for
    res = simulate(make_config(partition__vps=4, partition__lps=2, workload__policy="mask"), seed=5)
    sd = res.shootdowns
    assert sd.deferred_targets.sum() > 0 and res.vps.deferred_applied.sum() > 0
    assert res.vps.deferred_applied.sum() <= sd.deferred_targets.sum()


@pytest.mark.parametrize("policy", ["mask", "kvm-pv", "all"])
def test_every_refill_is_in_its_shootdowns_row(policy):
    """A deferred target flushes at its next dispatch, usually after the
    shootdown returned and was recorded: its refills still land in that
    shootdown's row, so the rows add up to the VPs' totals."""
    res = simulate(make_config(partition__vps=6, partition__lps=2, workload__policy=policy), seed=5)
    sd, vps = res.shootdowns, res.vps
    assert vps.deferred_applied.sum() > 0
    assert sd.refill_entries.sum() == pytest.approx(vps.refill_entries.sum(), rel=1e-9)
    assert sd.collateral_entries.sum() == pytest.approx(vps.collateral_entries.sum(), rel=1e-9, abs=1e-9)


def test_invariant_checker_catches_a_dropped_deferred_flush(monkeypatch):
    from tlbsim.model import vp as vp_mod

    monkeypatch.setattr(vp_mod.VP, "defer", lambda self, scope, sd, whole: None)
    with pytest.raises(InvariantError, match="neither flushed nor holds it pending"):
        simulate(make_config(partition__vps=4, partition__lps=2, workload__policy="mask"), seed=5)


# ---------------------------------------------------- qualitative behaviours
def p50(policy, seeds=range(3), **kw):
    vals = [simulate(make_config(workload__policy=policy, **kw), seed=s).summary["latency_p50_us"] for s in seeds]
    return float(np.mean(vals))


def test_ipi_latency_explodes_with_overcommit_while_paravirtual_flushes_do_not():
    kw = dict(partition__vps=8, partition__duration_us=60_000.0)
    for policy, limit in (("ipi", None), ("mask", 3.0), ("all", 3.0), ("kvm-pv", 3.0)):
        ratio = p50(policy, **kw, partition__lps=4) / p50(policy, **kw, partition__lps=8)
        if policy == "ipi":
            assert ratio > 100, ratio  # waits for descheduled targets: slices of 10 ms
        else:
            assert ratio < limit, (policy, ratio)


def test_all_processors_beats_a_dense_mask_but_costs_untargeted_refills():
    kw = dict(partition__vps=16, workload__sharing="groups", workload__group_size=8, workload__rate_per_ms=0.05)
    mask, allp = (simulate(quiet_config(workload__policy=p, **kw), seed=1) for p in ("mask", "all"))
    assert allp.summary["latency_p50_us"] < mask.summary["latency_p50_us"]
    assert mask.summary["collateral_entries"] == 0 and allp.summary["collateral_entries"] > 0
    assert allp.summary["refill_us"] > 1.5 * mask.summary["refill_us"]


def test_a_sparse_mask_beats_all_processors():
    kw = dict(partition__vps=16, workload__sharing="groups", workload__group_size=2)
    mask, allp = (simulate(quiet_config(workload__policy=p, **kw), seed=1) for p in ("mask", "all"))
    assert mask.summary["latency_p50_us"] < allp.summary["latency_p50_us"] / 2


def test_kvm_semantics_and_tlfs_agree_on_well_formed_calls():
    a = simulate(make_config(partition__semantics="kvm"), seed=9).shootdowns
    b = simulate(make_config(partition__semantics="tlfs"), seed=9).shootdowns
    pd.testing.assert_frame_equal(a, b)


def test_trace_replay(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("time_us,vp,address_space,pages\n100,0,0,1\n250.5,3,0,0\n900,1,0,4\n")
    res = simulate(quiet_config(workload__trace=str(trace), partition__vps=4, workload__policy="mask"), seed=0)
    sd = res.shootdowns.sort_values("issue_us")
    assert sd.initiator_vp.tolist() == [0, 3, 1]
    assert sd.issue_us.tolist() == [100.0, 250.5, 900.0]
    assert sd.pages.tolist() == [1, 0, 4]


def test_progress_reporting_changes_nothing():
    # the single-run progress bar: a process of its own; the model's records are identical
    for overrides in ({}, {"partition.lps": 8, "workload.policy": "ipi"},
                      {"vf.count": 2, "locks.vsm_rate_per_ms": 2.0, "workload.policy": "linux"}):
        cfg = make_config(partition__duration_us=20000.0, **{k.replace(".", "__"): v for k, v in overrides.items()})
        seen = []
        a, b = simulate(cfg, seed=3), simulate(cfg, seed=3, progress=seen.append)
        assert seen == [pytest.approx(i / 100) for i in range(1, 101)]
        for table in ("shootdowns", "vps", "exits", "vf"):
            assert getattr(a, table).equals(getattr(b, table)), table
        assert a.summary.equals(b.summary)
