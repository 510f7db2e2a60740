"""The array-backed VP state of large partitions (model/vp_arrays.py) against the plain VPs: the
same configuration run with the switch forced off and on gives the same tables bit for bit, on
both sides of the default switch size, and the switch picks the class it says."""

import numpy as np
import pandas as pd
import pytest

from tlbsim import Config, simulate
from tlbsim.model import vp_arrays
from tlbsim.model.partition import Partition
from tlbsim.model.vp import VP
from tlbsim.model.vp_arrays import HV_DEBT, NONGLOBAL, ArrayTlb, VpArrays, row_sum

TABLES = ("shootdowns", "vps", "exits")


def run(monkeypatch, arrays: bool, seed: int = 5, **overrides):
    monkeypatch.setattr(vp_arrays, "ARRAYS_FROM_VPS", 1 if arrays else 1 << 30)
    flat = {k.replace("__", "."): v for k, v in overrides.items()}
    return simulate(Config().with_overrides({"run.check_invariants": True, **flat}), seed=seed)


def hashes(res) -> dict:
    return {t: pd.util.hash_pandas_object(getattr(res, t), index=True).values.tobytes() for t in TABLES}


def assert_same(monkeypatch, **overrides):
    plain, arrays = run(monkeypatch, False, **overrides), run(monkeypatch, True, **overrides)
    for t in TABLES:
        pd.testing.assert_frame_equal(getattr(plain, t), getattr(arrays, t), check_exact=True)
    assert hashes(plain) == hashes(arrays)
    return plain


SMALL = {"partition__duration_us": 4000.0}
# each reaches a different part of the flush path: List calls with reissues (the default: every
# MemoryAccess exit holds TlbFlushInhibit), Space calls (non-global, whole context or exact), full
# flushes of every space (KVM: the per-VP path), INVLPGB / RAR (off-LP targets flushed at once),
# VSM locks, OpenHCL's snapshot, overcommit (deferred flushes), groups, two guests, IPIs
CASES = {
    "default": {},
    "space": {"guest__call_form": "space"},
    "space_exact": {"guest__call_form": "space", "tlb__hypervisor_flush": "exact"},
    "full_fraction": {"workload__full_flush_fraction": 0.3, "workload__pages": 4},
    "many_pages": {"workload__pages": 40},
    "kvm": {"partition__semantics": "kvm"},
    "invlpgb": {"host__broadcast_flush": "invlpgb"},
    "rar": {"host__broadcast_flush": "rar"},
    "vsm": {"locks__vsm_rate_per_ms": 2.0},
    "openhcl": {"partition__semantics": "openhcl", "locks__vsm_rate_per_ms": 1.0},
    "overcommit": {"partition__lps_half": True},
    "groups": {"workload__sharing": "groups", "workload__group_size": 5},
    "guests2": {"host__guests": 2},
    "ipi": {"workload__policy": "ipi"},
    "linux": {"workload__policy": "linux"},
    "wait_spin": {"locks__wait_spin_us": 5.0},
    "closed_kvm_pv": {"workload__mode": "closed", "partition__semantics": "kvm", "workload__policy": "kvm-pv"},
}


def _case(name: str, vps: int) -> dict:
    case = dict(CASES[name])
    lps = vps // 2 if case.pop("partition__lps_half", False) else vps
    return {"partition__vps": vps, "partition__lps": lps, "workload__rate_per_ms": 2.0, **SMALL, **case}


@pytest.mark.parametrize("name", sorted(CASES))
def test_arrays_on_and_off_give_identical_tables_small(monkeypatch, name):
    res = assert_same(monkeypatch, **_case(name, 24))
    assert len(res.shootdowns) > 50


@pytest.mark.parametrize("name", ["default", "space", "invlpgb", "overcommit", "vsm"])
def test_arrays_on_and_off_give_identical_tables_large(monkeypatch, name):
    res = assert_same(monkeypatch, **{**_case(name, 300), "partition__duration_us": 1000.0})
    assert len(res.shootdowns) > 100
    if name == "default":
        assert res.shootdowns.reissues.sum() > 0  # the reissue path ran on the arrays


def test_either_side_of_the_switch(monkeypatch):
    """At the default switch size and one below it the partition takes the path the switch says,
    and each size's tables match the other path's forced at the same size."""
    n = vp_arrays.ARRAYS_FROM_VPS
    for vps, expect_arrays in ((n - 1, False), (n, True)):
        cfg = Config().with_overrides({"partition.vps": vps, "partition.lps": vps, "partition.duration_us": 10.0})
        part = Partition(cfg, 0)
        assert (part.vp_arrays is not None) == expect_arrays
        assert isinstance(part.vps[0].tlb, ArrayTlb) == expect_arrays
        assert type(part.vps[0]) is VP or expect_arrays
        assert_same(monkeypatch, partition__vps=vps, partition__lps=vps, partition__duration_us=600.0)


def test_array_vp_fields_read_and_write_their_arrays():
    cfg = Config().with_overrides({"partition.vps": 4, "partition.lps": 4, "partition.duration_us": 10.0})
    old = vp_arrays.ARRAYS_FROM_VPS
    try:
        vp_arrays.ARRAYS_FROM_VPS = 1
        part = Partition(cfg, 0)
    finally:
        vp_arrays.ARRAYS_FROM_VPS = old
    a: VpArrays = part.vp_arrays
    vp = part.vps[2]
    vp.hv_debt_us = 1.5
    vp.tlb.nonglobal = 7.25
    vp.on_lp = True
    vp.state_us[0] += 3.0
    assert a.f[HV_DEBT, 2] == 1.5 and a.f[NONGLOBAL, 2] == 7.25 and bool(a.on_lp[2])
    vp.flushes_applied += 2
    assert vp.flushes_applied == 2 and type(vp.flushes_applied) is int
    assert a.guest_us[2] == 3.0 and type(vp.hv_debt_us) is float and vp.on_lp is True
    assert part.vps[1].hv_debt_us == 0.0 and not part.vps[1].on_lp
    c = vp.clock()
    c[0] += 1.0  # a copy
    assert vp.state_us[0] == 3.0


def test_row_sum_adds_in_order():
    values = np.array([1e16, 1.0, -1e16, 1.0])
    expect = 0.5
    for v in values:
        expect += v
    assert row_sum(0.5, values) == expect
    assert row_sum(2.0, np.array([])) == 2.0


def test_array_plan_membership_is_the_plain_plans():
    """An array-backed plan packs its membership bits from its target flags: the same int as
    hv.bits_of, and the flags are the targets."""
    from tlbsim import hv
    from tlbsim.model.tlb import FlushScope

    cfg = Config().with_overrides({"partition.vps": 300, "partition.lps": 300, "partition.duration_us": 10.0})
    part = Partition(cfg, 0)
    assert part.vp_arrays is not None
    for caller in (0, 5, 299):
        vp = part.vps[caller]
        targets = part.targets_of(vp, vp.address_space)
        for pages in (1, None):
            call, scope = part.policy.build(vp, None, FlushScope(vp.address_space, True, pages), targets)
            plan = part.hypervisor.plan(vp, call, scope, targets)
            indices = [t.index for t in targets]
            assert plan.member == hv.bits_of(indices, hv.MAX_VP_INDEX)
            assert (np.flatnonzero(plan.vmask) + plan.lo).tolist() == indices
            assert plan.flushable.tolist() == plan.vmask.tolist()  # one address space, a working set each


def test_tlbsim_checks_exact_tier_holds_with_the_arrays_forced_on(monkeypatch):
    """Issue 26: `tlbsim check`'s exact tier (every committed baseline scenario, each below the switch
    size) gives the committed values bit for bit with the array-backed VP state forced on."""
    from pathlib import Path

    from tlbsim import regress
    from tlbsim.model import vp_arrays

    monkeypatch.setattr(vp_arrays, "ARRAYS_FROM_VPS", 1)
    rows = regress.check(Path(__file__).resolve().parents[1] / "results" / "baselines", {"exact"})
    assert rows and not [r.as_dict() for r in rows if r.failed]
