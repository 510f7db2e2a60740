"""The SimPy model against closed forms, statistics and the behaviours
docs/calibration.md says it must show. Invariant checks are on
in every run here (conftest.make_config)."""

import math

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_config, quiet_config
from tlbsim import Config, simulate
from tlbsim.hv import HvCallCode
from tlbsim.model.accounting import TIME_COLUMNS
from tlbsim.model.partition import InvariantError

# One initiator (VP 0), 8 VPs sharing one address space, no exits: every
# target is running guest code whenever VP 0 shoots down.
C = Config().costs  # closed forms below are derived from the defaults, not restated
EXIT_COST = Config().exits
BASE = dict(partition__vps=8, workload__initiators=[0], workload__rate_per_ms=0.05, partition__duration_us=200_000.0)


def latencies(policy, **kw):
    res = simulate(quiet_config(workload__policy=policy, **{**BASE, **kw}), seed=3)
    sd = res.shootdowns
    assert len(sd) > 3 and (sd.status == "SUCCESS").all()
    return sd


K = 7  # running targets
LOCAL = C.local_flush_cost_us(1)  # the initiator's own 1-page flush
ENTRY = C.vmexit_roundtrip_us + C.hypercall_decode_us
CANCELED = EXIT_COST.canceled.cost_us
LIST1 = C.list_per_range_us  # a List call's one range (its page is the targets' work)
IPI_HIT = C.target_interrupt_us + C.vmexit_roundtrip_us  # an IPI target: the hypervisor's interruption, its EOI trap


def fanout(k, pages=1):
    """IPIs sent back to back, then the slowest acknowledgement: its round trip, the target's
    interruption and its INVLPGs (docs/model.md "Hypervisor fan-out")."""
    return k * C.hv_ipi_send_us + C.hv_ipi_roundtrip_us + C.target_interrupt_us + pages * C.invlpg_us


@pytest.mark.parametrize(
    "policy,expected_us",
    [
        # local flush, exit+decode, mask walk over K VPs, K running targets flushed; 1 page: the List
        # call, one range and one INVLPG
        ("mask", LOCAL + ENTRY + K * C.mask_per_vp_us + LIST1 + fanout(K)),
        # ALL_PROCESSORS: no walk, the same fan-out
        ("all", LOCAL + ENTRY + LIST1 + fanout(K)),
        # all 8 VPs share the mm -> ALL_PROCESSORS, 1 page -> List call
        ("linux", LOCAL + ENTRY + LIST1 + fanout(K)),
        # local, K trapped ICR writes; the last target is interrupted by the hypervisor, flushes and
        # EOIs (a trap: no posted interrupts)
        ("ipi", LOCAL + K * C.vipi_us() + IPI_HIT + LOCAL),
        # local, one PV send-IPI hypercall, then the same on each target
        ("kvm-pv", LOCAL + C.vmexit_roundtrip_us + K * C.pv_ipi_per_target_us + IPI_HIT + LOCAL),
    ],
)
def test_latency_with_k_running_targets_is_the_closed_form(policy, expected_us):
    sd = latencies(policy)
    np.testing.assert_allclose(sd.latency_us, expected_us, rtol=0, atol=1e-9)
    assert (sd.n_targets == K).all()


@pytest.mark.parametrize(
    "apic,posted,expected_us,stack_exits",
    [
        # in-hypervisor APIC, no posted interrupts: interruption + EOI trap, no exit reaches the stack
        ("hypervisor", False, LOCAL + K * C.vipi_send_us + IPI_HIT + LOCAL, {}),
        # posted interrupts (APICv / IPIv): the sender's discount, and a running target takes no exit at all
        ("hypervisor", True, LOCAL + K * C.vipi_us_posted() + LOCAL, {}),
        # a user-mode APIC: each ICR write is an X64MsrAccess exit, each delivery a Canceled exit
        # a user-mode APIC: each ICR write is an X64MsrAccess exit, each delivery a Canceled exit, each EOI
        # an X64MsrAccess exit (x2APIC)
        ("user", False, LOCAL + K * C.vipi_send_us + CANCELED + LOCAL + EXIT_COST.x64_msr_access.cost_us,
         {"X64_MSR_ACCESS": 2 * K, "CANCELED": K}),
    ],
)
def test_interrupt_delivery(apic, posted, expected_us, stack_exits):
    sd = latencies("ipi", partition__apic_emulation=apic, costs__posted_interrupts=posted)
    np.testing.assert_allclose(sd.latency_us, expected_us, rtol=0, atol=1e-9)
    res = simulate(quiet_config(workload__policy="ipi", partition__apic_emulation=apic,
                                costs__posted_interrupts=posted, **BASE), seed=3)
    n = len(res.shootdowns)
    exits = res.exits.groupby("reason")["count"].sum()
    assert {r: int(c) for r, c in exits.items() if c} == {r: c * n for r, c in stack_exits.items()}
    vps = res.vps
    assert vps.ipis_received.sum() == K * n
    assert vps.icr_writes.sum() == (0 if apic == "user" else K * n)
    assert vps.eoi_traps.sum() == (K * n if apic == "hypervisor" and not posted else 0)


@pytest.mark.parametrize(
    "policy,events",
    [
        # the arrival (the initiator's guest interval ends), the local flush, the hypercall
        ("mask", 3), ("all", 3), ("linux", 3),
        # initiator: arrival, local flush, the 7 trapped ICR writes (the last delivery rides on the
        # sender's own timeout, guest._sent: 6 deliveries of their own), the last ack; no spin window
        # timer (every ack is due before the window would end: guest.AckWait.acked_before); each of
        # the 7 targets: its Canceled exit and handler (one timeout), resuming guest code. The
        # delivery wakes the target itself: no Interruption event (vp.wake_for_ipi)
        ("ipi", 3 + 6 + 1 + 7 * 2),
        # initiator: arrival, local flush, the PV send-IPI hypercall (carrying the delivery to all),
        # the last ack
        ("kvm-pv", 3 + 1 + 7 * 2),
    ],
)
def test_simpy_events_per_shootdown(policy, events):
    """Hypervisor flushes cost no event per target; IPIs cost two per target beyond their delivery."""
    from tlbsim.model.partition import simulate_records

    cfg = quiet_config(workload__policy=policy, **BASE)
    with_sd = simulate_records(cfg, 3)
    idle = simulate_records(cfg.with_overrides({"workload.rate_per_ms": 0.0}), 3)
    n = len(with_sd.shootdowns["id"])
    assert n > 3
    assert with_sd.events - idle.events == events * n


def test_state_switch_in_the_past_moves_time_exactly():
    """TimeAccount.switch_at (the Canceled exit and the IPI handlers share one
    timeout): the time after the switch belongs to the new state, even if
    the VP was settled after that moment."""
    from tlbsim.model.accounting import TimeAccount, VpState
    from tlbsim.model.tlb import Tlb

    EXIT, FLUSH = VpState.EXIT, VpState.FLUSH
    acct = TimeAccount(None, Tlb(0x1000, 16, 8, 0, 1.0, True), start=EXIT)
    acct.switch_at(FLUSH, 2.0)
    assert (acct.state, acct.since, acct.state_us[EXIT], acct.state_us[FLUSH]) == (FLUSH, 2.0, 2.0, 0.0)
    acct.state = EXIT
    acct.set_state(EXIT, 5.0)  # settled at 5 us while in the exit
    acct.switch_at(FLUSH, 2.0)
    assert (acct.state, acct.since, acct.state_us[EXIT], acct.state_us[FLUSH]) == (FLUSH, 5.0, 2.0, 3.0)


def test_tlb_fast_path_agrees_with_flush():
    """Tlb.flush_space_nonglobal is the documented fast path of Tlb.flush for a
    whole-space, non-global scope: same (required, removed) and same TLB after."""
    from tlbsim.model.tlb import FlushScope, Tlb

    rng = np.random.default_rng(0)
    for _ in range(500):
        own = 0x1000 * int(rng.integers(1, 4))
        working_set, global_pages = int(rng.integers(0, 2000)), int(rng.integers(0, 400))
        a, b = (Tlb(own, 1536, working_set, global_pages, 20.0, True) for _ in "ab")
        fill = float(rng.uniform(0, 1))
        a.nonglobal = b.nonglobal = a.nonglobal_cap * fill
        named = [None, own, own + 0x1000][int(rng.integers(0, 3))]
        whole = bool(rng.integers(0, 2))
        assert a.flush(FlushScope(named, True, None), whole) == b.flush_space_nonglobal(named, whole)
        assert (a.nonglobal, a.global_entries) == (b.nonglobal, b.global_entries)


def test_tlb_page_flush_removes_what_the_scope_requires():
    """Tlb.flush_pages (and Tlb.flush of a page scope, which takes it) removes exactly what
    Tlb.required says a page scope requires, whatever the scope's other fields: exact, no collateral."""
    from tlbsim.model.tlb import FlushScope, Tlb

    rng = np.random.default_rng(1)
    for _ in range(500):
        own = 0x1000 * int(rng.integers(1, 4))
        working_set, global_pages = int(rng.integers(0, 2000)), int(rng.integers(0, 400))
        a, b = (Tlb(own, 1536, working_set, global_pages, 20.0, True) for _ in "ab")
        a.nonglobal = b.nonglobal = a.nonglobal_cap * float(rng.uniform(0, 1))
        named = [None, own, own + 0x1000][int(rng.integers(0, 3))]
        pages = int(rng.integers(0, 3000))
        scope = FlushScope(named, bool(rng.integers(0, 2)), pages)
        required, before = a.required(scope), (a.nonglobal, a.global_entries)
        assert b.flush_pages(named, pages) == (required, required)
        assert (b.nonglobal, b.global_entries) == (before[0] - required, before[1])
        assert a.flush(scope, bool(rng.integers(0, 2))) == (required, required)
        assert (a.nonglobal, a.global_entries) == (b.nonglobal, b.global_entries)


def test_batched_page_flush_agrees_with_flushing_each_target():
    """hypervisor.flush_pages_by_hypervisor (the hypervisor's fast path for a List call) leaves every target,
    running or not, and the shootdown's row bit for bit as VP.flush_by_hypervisor / VP.defer_flush per
    target and ShootdownRecorder.running_flushed do, from random states (guest or not, debts, fill,
    other address spaces)."""
    from tlbsim.model.hypervisor import flush_pages_by_hypervisor
    from tlbsim.model.partition import Partition
    from tlbsim.model.tlb import FlushScope
    from tlbsim.model.vp import GUEST, HALTED, SPINNING
    from tlbsim.model.workload import Request

    rng = np.random.default_rng(7)
    config = make_config(partition__vps=40, partition__lps=40, partition__duration_us=10.0)
    for trial in range(20):
        parts = [Partition(config, 0) for _ in "ab"]
        draws = [(int(rng.integers(0, 2)), bool(rng.integers(0, 4)), float(rng.uniform(0, 80)),
                  [0.0, float(rng.uniform(0, 30))][int(rng.integers(0, 2))],
                  [0.0, float(rng.uniform(0, 30))][int(rng.integers(0, 2))], float(rng.uniform(0, 1)),
                  int(rng.integers(0, 3))) for _ in range(40)]
        for part in parts:
            for vp, (guest, on_lp, since, hv_debt, refill_debt, fill, other) in zip(part.vps, draws, strict=True):
                vp.state = GUEST if guest else [HALTED, SPINNING][since > 40]
                vp.on_lp, vp.since, vp.hv_debt_us, vp.refill_debt_us = on_lp, since, hv_debt, refill_debt
                vp.tlb.nonglobal = vp.tlb.nonglobal_cap * fill
                vp.tlb.address_space += 0x1000 * (other == 2)
        space, pages, now = parts[0].vps[0].address_space, int(rng.integers(0, 600)), 100.0
        scope = FlushScope([space, None][trial % 2], True, pages)
        rows = []
        for part in parts:
            targets = part.vps[1:]
            rows.append(part.recorder.started(0, "mask", Request(0.0, space, pages), 0.0, targets, 0,
                                              part.vps[0].clock()))
            rows[-1].refill_entries = 3.25
        a, b = parts
        flushed = []
        debt, defer_idle = [0.0, 1.23][trial % 2], trial % 3 != 0  # a broadcast: no debt, idle VPs flushed now
        for t in a.vps[1:]:
            if t.on_lp:
                flushed.append(t.flush_by_hypervisor(scope, rows[0], True, now, debt))
            elif defer_idle:
                t.defer_flush(scope, rows[0], True)
            else:
                t.flush_now_idle(scope, rows[0], True)
        a.recorder.running_flushed(rows[0], flushed)
        required, deferred = flush_pages_by_hypervisor(b.vps[1:], scope, True, rows[1], now, debt,
                                                       config.costs.refill_us, True, defer_idle)
        b.recorder.running_flushed_pages(rows[1], required)
        b.recorder.deferred(rows[1], deferred)

        def state(vp):
            return (vp.state, vp.since, vp.time_columns(), vp.hv_debt_us, vp.refill_debt_us, vp.refill_entries,
                    vp.collateral_entries, vp.flushes_applied, vp.applied_ids, vp.tlb.nonglobal,
                    vp.tlb.global_entries)

        for x, y in zip(a.vps, b.vps, strict=True):
            assert state(x) == state(y)
            assert [(sc, w) for _, sc, w in x.deferred] == [(sc, w) for _, sc, w in y.deferred]
        fields = ("running_targets", "deferred_targets", "refill_entries", "collateral_entries")
        assert [getattr(rows[0], f) for f in fields] == [getattr(rows[1], f) for f in fields]
        assert rows[0].running_targets > 0 and (rows[0].deferred_targets > 0) == defer_idle


def test_lock_holders_agree_with_asking_every_target():
    """TlbLocks.holders asks each source for the VPs it locks; the answer (and its order) is the one
    asking every target in turn which sources lock it (the lock that lifts last; the first source on a tie)
    gives, on random lock states of two sources."""
    from types import SimpleNamespace

    from tlbsim.model.locks import InterceptInhibit, TlbLocks, VsmTlbLocks

    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        needs = rng.integers(0, 4, size=n) > 0  # whether each VP's TLB requires the flush

        def requires_of(i, needs=needs):
            return lambda scope: bool(needs[i])

        vps = [SimpleNamespace(index=i, in_vtl1=bool(rng.integers(0, 2)), vtl1_end_us=float(rng.uniform(0, 50)),
                               requires=requires_of(i)) for i in range(n)]
        inhibit = InterceptInhibit()
        for i in rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False):
            inhibit.begin(int(i), float(rng.uniform(0, 50)))
        vsm = VsmTlbLocks({vp.index: vp for vp in vps if rng.integers(0, 2)})
        locks = TlbLocks([inhibit, vsm])
        targets = sorted((vps[int(i)] for i in rng.permutation(n)[: int(rng.integers(0, n + 1))]),
                         key=lambda t: t.index)  # a plan's targets: ascending VP index
        expected = []
        for t in targets:
            lock = None
            for source in locks.sources:
                end = dict(source.locked()).get(t.index)
                if end is not None and (lock is None or end > lock[0]):
                    lock = (end, source.name)
            if lock is not None and t.requires(None):
                expected.append((lock[0], lock[1], t))
        member = sum(1 << t.index for t in targets)
        assert locks.holders(vps, member, None, 0.0) == expected


def test_call_codes_and_flags_per_policy():
    LIST, SPACE = HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST, HvCallCode.FLUSH_VIRTUAL_ADDRESS_SPACE
    # a 1-page range: the List call (NON_GLOBAL is invalid there), as Windows and Linux flush small ranges
    assert (latencies("mask").call_code == LIST).all() and (latencies("mask")["flags"] == 0).all()
    assert (latencies("all").call_code == LIST).all() and (latencies("all")["flags"] == 0x1).all()
    # call_form = "space": always HvCallFlushVirtualAddressSpace(NON_GLOBAL)
    assert (latencies("mask", guest__call_form="space").call_code == SPACE).all()
    assert (latencies("mask", guest__call_form="space")["flags"] == 0x4).all()
    assert (latencies("all", guest__call_form="space")["flags"] == 0x5).all()
    # above the ceiling: the Space call with NON_GLOBAL, for mask and linux alike
    big = C.flush_ceiling_pages + 1
    assert (latencies("mask", workload__pages=big).call_code == SPACE).all()
    linux = latencies("linux")
    assert (linux.call_code == LIST).all() and (linux["flags"] == 0x1).all()
    whole = latencies("linux", workload__pages=big)  # above the ceiling: whole mm, NON_GLOBAL
    assert (whole.call_code == SPACE).all() and (whole["flags"] == 0x5).all()
    assert (latencies("ipi").call_code == 0).all() and (latencies("ipi").ipis == 7).all()
    assert (latencies("mask").hypercall_status == "SUCCESS").all() and (latencies("ipi").hypercall_status == "").all()


def test_ex_call_when_a_target_index_is_64_or_more():
    sd = latencies("mask", partition__vps=130, partition__lps=130, workload__sharing="groups",
                   workload__group_size=130, workload__rate_per_ms=0.5, partition__duration_us=20_000.0)
    assert (sd.call_code == HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST_EX).all()
    # 129 targets named in 3 banks: exit+decode, the walk over 129 VPs, 3 bank words, 129 running targets
    call = ENTRY + 129 * C.mask_per_vp_us + 3 * C.vp_set_per_bank_us + LIST1 + fanout(129)
    # one range: a rep call can only return at a rep boundary, so however long it runs it never continues
    assert (sd.continuations == 0).all()
    np.testing.assert_allclose(sd.latency_us, LOCAL + call, atol=1e-9)


def test_no_hypercall_without_targets():
    sd = latencies("mask", workload__sharing="private")
    assert (sd.call_code == 0).all() and (sd.n_targets == 0).all()
    np.testing.assert_allclose(sd.latency_us, LOCAL, atol=1e-12)


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
    total = vps[[f"{c}_us" for c in TIME_COLUMNS]].sum(axis=1)
    np.testing.assert_allclose(total, 50_000.0, rtol=1e-12)
    assert (vps.descheduled_us > 0).all()  # 8 VPs on 5 LPs: everyone waits sometimes


def test_exits_are_counted_per_reason():
    res = simulate(make_config(partition__duration_us=200_000.0), seed=4)
    ex = res.exits.groupby("reason")["count"].sum()
    # MemoryAccess and IoPort share a rate (0.5/ms of guest time): counts agree within noise
    assert ex["MEMORY_ACCESS"] > 500 and abs(ex["MEMORY_ACCESS"] - ex["X64_IO_PORT_ACCESS"]) < 0.2 * ex["MEMORY_ACCESS"]
    t = res.exits.groupby("reason")["time_us"].sum()
    assert t["MEMORY_ACCESS"] == pytest.approx(EXIT_COST.memory_access.cost_us * ex["MEMORY_ACCESS"])


def test_flush_removes_entries_and_costs_refills():
    # Warm TLBs hold the whole working set (non-global + global fit in the default capacity).
    # mask: the initiator's own 1-page flush removes 1 entry; each of the 7 targets loses its
    # non-global working set to the hypervisor's whole-address-space flush.
    t = Config().tlb
    assert t.working_set_pages + t.global_pages <= t.capacity
    whole = latencies("mask", guest__call_form="space")
    assert whole.refill_entries.iloc[0] == pytest.approx(1 + K * t.working_set_pages)
    # a 1-page List call (mask, linux) removes one entry on each of the 8 VPs: the page is cached with
    # probability cached / working set = 1 on a warm TLB
    assert latencies("mask").refill_entries.iloc[0] == pytest.approx(8.0)
    assert latencies("linux").refill_entries.iloc[0] == pytest.approx(8.0)
    # each removed entry is one refill, repaid from guest time
    res = simulate(quiet_config(workload__policy="mask", **BASE), seed=3)
    refills = res.vps.refill_entries.sum() + res.vps.evicted_entries.sum()
    assert res.vps.refill_us.sum() == pytest.approx(refills * C.refill_us, rel=1e-6)


def test_mean_suspension_matches_exponential_residual_life():
    """VSM TlbLocked on VP 1 only, exponential holds of mean h, gaps of mean g.
    A Poisson-arriving call sees the lock held with probability h / (h + g)
    (PASTA). It pays exit+decode (d = 0.7 us) before suspending, so the time
    suspended is max(0, R - d) with R ~ Exp(h) (memoryless residual life):
    mean h * exp(-d / h)."""
    h, g, d = 40.0, 160.0, ENTRY
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


def test_a_lock_held_past_the_end_is_reported_incomplete():
    # a VTL1 hold far beyond the run: the caller stays suspended; the run still ends
    c = quiet_config(partition__vps=2, workload__initiators=[0], workload__rate_per_ms=1.0,
                     locks__vsm_rate_per_ms=1.0, locks__vsm_hold_mean_us=1e12,
                     locks__vsm_hold_distribution="fixed", locks__vsm_vps=[1])
    res = simulate(c, seed=0)
    stuck = res.shootdowns[res.shootdowns.status == "INCOMPLETE"]
    assert len(stuck) >= 1 and (stuck.stuck_on == "suspended on a locked TLB").any()
    assert res.summary["shootdowns_incomplete"] == len(stuck)


def test_infinite_costs_and_holds_are_rejected():
    from tlbsim.config import ConfigError

    for key in ("locks.vsm_hold_mean_us", "costs.refill_us", "exits.memory_access.cost_us", "workload.rate_per_ms"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Config().with_overrides({key: math.inf})


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


def test_invariant_checker_catches_a_dropped_deferred_flush():
    # run.inject_fault: the model loses every deferred flush; the checker must notice
    cfg = make_config(partition__vps=4, partition__lps=2, workload__policy="mask")
    simulate(cfg, seed=5)  # the same run without the fault holds
    with pytest.raises(InvariantError, match="neither flushed nor holds it pending"):
        simulate(cfg.with_overrides({"run.inject_fault": "drop_deferred_flush"}), seed=5)


# ---------------------------------------------------- qualitative behaviours
def p50(policy, seeds=range(3), **kw):
    vals = [simulate(make_config(workload__policy=policy, **kw), seed=s).summary["latency_p50_us"] for s in seeds]
    return float(np.mean(vals))


def test_ipi_latency_explodes_with_overcommit_while_paravirtual_flushes_do_not():
    kw = dict(partition__vps=8, partition__duration_us=60_000.0)
    for policy, limit in (("mask", 3.0), ("all", 3.0), ("kvm-pv", 3.0)):
        ratio = p50(policy, **kw, partition__lps=4) / p50(policy, **kw, partition__lps=8)
        assert ratio < limit, (policy, ratio)
    # IPIs wait for descheduled targets: without yielding, up to a 10 ms slice; spinning that yields
    # (the long spin wait notification, then a directed yield) hands the LP to them and cuts the wait
    dedicated = p50("ipi", **kw, partition__lps=8)
    no_yield = p50("ipi", **kw, partition__lps=4, spin__mode="off")
    yielding = p50("ipi", **kw, partition__lps=4)
    assert no_yield / dedicated > 100, (no_yield, dedicated)
    assert yielding / dedicated > 10 and yielding < no_yield / 3, (yielding, no_yield)


def test_all_processors_vs_mask_crossover_follows_from_the_walk_and_the_collateral():
    """ALL_PROCESSORS and a ProcessorMask cost the same per running target; ALL saves the mask walk
    but interrupts every running VP. When every VP shares the address space, ALL is cheaper by exactly
    the walk; with small groups, the mask is cheaper by the sends to the extra VPs ALL interrupts,
    less its walk (the slowest acknowledgement costs both the same), and ALL's extra targets pay."""
    n = 16
    dense = {p: latencies(p, partition__vps=n) for p in ("mask", "all")}
    walk = (n - 1) * C.mask_per_vp_us
    np.testing.assert_allclose(dense["mask"].latency_us.to_numpy() - dense["all"].latency_us.to_numpy(), walk,
                               atol=1e-9)
    kw = dict(partition__vps=n, workload__sharing="groups", workload__group_size=2, workload__rate_per_ms=0.5)
    sparse = {p: simulate(quiet_config(workload__policy=p, **kw), seed=1) for p in ("mask", "all")}
    gap = sparse["all"].summary["latency_p50_us"] - sparse["mask"].summary["latency_p50_us"]
    assert gap == pytest.approx((n - 2) * C.hv_ipi_send_us - C.mask_per_vp_us, abs=1e-9)
    hit = C.target_interrupt_us + C.invlpg_us  # what each interrupted target owes
    assert sparse["all"].vps.hv_flush_us.sum() > 5 * sparse["mask"].vps.hv_flush_us.sum()
    assert sparse["all"].vps.hv_flush_us.sum() == pytest.approx(
        hit * (sparse["all"].shootdowns.running_targets.sum()), rel=0.01)
    # the Space call drops each interrupted VP's working set: ALL's non-sharers pay it as collateral
    space = {p: simulate(quiet_config(workload__policy=p, guest__call_form="space", **kw), seed=1)
             for p in ("mask", "all")}
    assert space["mask"].summary["collateral_entries"] == 0 and space["all"].summary["collateral_entries"] > 0
    assert space["all"].summary["refill_us"] > 1.5 * space["mask"].summary["refill_us"]


def test_kvm_profile_flushes_the_whole_tlb_and_never_suspends():
    kw = dict(locks__vsm_rate_per_ms=5.0, locks__vsm_hold_mean_us=40.0, guest__call_form="space")
    tlfs = simulate(make_config(partition__semantics="tlfs", **kw), seed=9)
    kvm = simulate(make_config(partition__semantics="kvm", **kw), seed=9)
    assert tlfs.summary["suspensions"] > 0 and kvm.summary["suspensions"] == 0
    # KVM ignores NON_GLOBAL_MAPPINGS_ONLY: global entries go too, so more is removed per flush
    per_flush = {name: r.vps.refill_entries.sum() / max(1, r.vps.flushes_applied.sum())
                 for name, r in (("tlfs", tlfs), ("kvm", kvm))}
    assert per_flush["kvm"] > per_flush["tlfs"]


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


def test_incomplete_shootdowns_are_censored_not_dropped():
    # VP 1 in VTL1 far beyond the end: VP 0's shootdowns wait; their latency is at least what they waited
    c = quiet_config(partition__vps=2, workload__initiators=[0], workload__rate_per_ms=1.0,
                     locks__vsm_rate_per_ms=1.0, locks__vsm_hold_mean_us=1e12,
                     locks__vsm_hold_distribution="fixed", locks__vsm_vps=[1], partition__duration_us=20_000.0)
    res = simulate(c, seed=0)
    sd, s = res.shootdowns, res.summary
    inc = sd[sd.status == "INCOMPLETE"]
    queued = sd[sd.status == "QUEUED"]  # the arrivals behind the stuck one: rows too, never started
    assert len(inc) >= 1 and len(queued) >= 1
    assert s["incomplete_fraction"] == pytest.approx((len(inc) + len(queued)) / len(sd))
    waited = 20_000.0 - inc.issue_us
    done = sd[sd.status == "SUCCESS"].latency_us
    pooled = np.concatenate([done, waited])
    assert s["latency_p99_us"] == pytest.approx(np.percentile(pooled, 99))
    assert s["latency_max_us"] <= pooled.max()
    assert bool(s["latency_p99_is_lower_bound"]) == bool(waited.max() >= s["latency_p99_us"])


def test_a_timeline_changes_nothing_and_is_valid_chrome_trace(tmp_path):
    from tlbsim.model.timeline import Timeline, TracingVP
    from tlbsim.model.vp import VP
    from tlbsim.timeline_output import chrome_trace, draw_timeline

    cfg = make_config(partition__vps=6, partition__lps=3, workload__policy="ipi", partition__duration_us=20_000.0,
                      locks__vsm_rate_per_ms=1.0, vf__count=1)
    plain = simulate(cfg, seed=2)
    timeline = Timeline(1000.0, 6000.0)
    traced = simulate(cfg, seed=2, timeline=timeline)
    for table in ("shootdowns", "vps", "exits", "vf"):
        pd.testing.assert_frame_equal(getattr(plain, table), getattr(traced, table))
    assert timeline.segments and timeline.instants and timeline.shootdowns
    trace = chrome_trace(timeline, 6, traced.vf.to_dict("records"))
    for e in trace["traceEvents"]:
        assert e["ph"] in {"M", "X", "i", "b", "e"}
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] + e["dur"] >= 1000.0 and e["ts"] <= 6000.0
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"guest", "descheduled"} <= names and any(n.isupper() for n in names)  # exit reasons by name
    # per VP, the state segments inside the window tile it without overlap
    seg = sorted((s for s in timeline.segments if s[0] == 0), key=lambda s: s[2])
    for a, b in zip(seg, seg[1:], strict=False):
        assert b[2] >= a[3] - 1e-9
    draw_timeline(timeline, tmp_path / "t.png", 6)
    assert (tmp_path / "t.png").stat().st_size > 5000
    # off by default: the plain VP class, no per-event hook
    from tlbsim.model.partition import Partition

    assert type(Partition(cfg, 0).vps[0]) is VP and TracingVP is not VP


@pytest.mark.parametrize("lists_up_to", [0, 256])
@pytest.mark.parametrize("sharing", ["all", "groups", "private"])
def test_targets_of_are_the_other_sharers_in_order(monkeypatch, sharing, lists_up_to):
    """Partition.targets_of gives every other VP that runs the address space, in VP order, whether as a
    view of the shared list (OtherVPs, beyond TARGET_LISTS_UP_TO sharers) or a list; a view is not a
    copy and repeats no VP."""
    from tlbsim.model import partition
    from tlbsim.model.partition import OtherVPs, Partition

    monkeypatch.setattr(partition, "TARGET_LISTS_UP_TO", lists_up_to)
    part = Partition(Config().with_overrides({"partition.vps": 12, "partition.lps": 12, "workload.sharing": sharing,
                                              "workload.group_size": 4}), 0)
    for vp in part.vps:
        targets = part.targets_of(vp, vp.address_space)
        expected = [t for t in part.vps if t is not vp and t.address_space == vp.address_space]
        assert list(targets) == expected and len(targets) == len(expected)
        assert bool(targets) == bool(expected)
        assert part.targets_of(vp, vp.address_space) is targets  # computed once
        if sharing != "private":
            assert isinstance(targets, OtherVPs if lists_up_to == 0 else list)
    view = OtherVPs(["a", "b", "c"], 0)
    assert (list(view), len(view)) == (["b", "c"], 2) and list(OtherVPs(["a"], 0)) == []


def test_string_column_codes_batches_with_new_values_as_one_value_at_a_time():
    """recorder.StringCodes.extend takes a batch by dict lookup and falls back to coding it value by value
    when the batch holds a value not seen before: the codes and table are those of coding each value
    in turn, with nothing appended twice; an iterator is taken as well as a tuple."""
    from tlbsim.model.recorder import StringCodes

    batches = [("a", "b", "a"), ["a", "b"], ("b", "c", "a", "d"), ["d", "e"], (), ("e",)]
    batched, single = StringCodes(), StringCodes()
    for i, values in enumerate(batches):
        batched.extend(iter(values) if i == 3 else values)
        for v in values:
            single.extend((v,))
    assert list(batched.codes) == list(single.codes) == [0, 1, 0, 0, 1, 1, 2, 0, 3, 3, 4, 4]
    assert batched.table == single.table == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    too_many = StringCodes()
    with pytest.raises(ValueError, match="too many distinct"):
        too_many.extend([str(i) for i in range(200)])
    assert len(too_many.codes) == 0  # nothing of a refused batch is kept
