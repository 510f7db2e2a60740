"""SR-IOV VF configuration-block invalidations: the chain's timing against
closed forms, coalescing, descheduled service VPs, fault injection and the
invariant checker."""

import numpy as np
import pytest

from tests.conftest import make_config, quiet_config
from tlbsim import ConfigError, simulate
from tlbsim.cli import main
from tlbsim.model import InvariantError

# Default chain costs (experiments/configs/default.toml [vf]), us.
VMBUS, COMPLETE, HOP, ISSUE, DISPATCH, READ_GUEST, PF_READ = 15.0, 2.0, 5.0, 1.0, 2.0, 2.0, 5.0
CANCELED = 1.0  # exits.canceled.cost_us: a host message kicks a VP out of guest code


def write_trace(tmp_path, rows, name="pf.csv"):
    path = tmp_path / name
    path.write_text("time_us,vf,block_mask\n" + "".join(f"{t},{vf},{m}\n" for t, vf, m in rows))
    return str(path)


def idle_vf_config(tmp_path, rows, **kw):
    """No exits, no shootdowns: the service VP is always in guest code, so
    every cost is deterministic."""
    base = {"vf__count": 1, "vf__trace": write_trace(tmp_path, rows), "workload__rate_per_ms": 0.0,
            "partition__duration_us": 5000.0}
    return quiet_config(**{**base, **kw})


def test_one_call_latency_is_the_closed_form(tmp_path):
    # A call naming blocks 0 and 2 at t = 1000 (the IOCTL reached the host at t = 15):
    #   stack sends at once; VMBus; Canceled exit + IOCTL completion   -> delivered
    #   passive hop, next IOCTL, OID dispatch (guest-internal: no exit)
    #   per block: VMBus, PF read OID, VMBus, Canceled exit + guest completion
    res = simulate(idle_vf_config(tmp_path, [(1000.0, 0, 0b101)]), seed=0)
    row = res.vf.iloc[0]
    delivered = 1000.0 + VMBUS + CANCELED + COMPLETE
    per_block = VMBUS + PF_READ + VMBUS + CANCELED + READ_GUEST
    done = delivered + HOP + ISSUE + DISPATCH + 2 * per_block
    assert row.sent_us == 1000.0
    assert row.delivered_us == pytest.approx(delivered, abs=1e-9)
    assert row.read_done_us == pytest.approx(done, abs=1e-9)
    assert row.latency_us == pytest.approx(done - 1000.0, abs=1e-9)
    assert row.status == "read" and row.coalesced == 1 and not row.dropped
    # the guest work is VP 0's time in state "vf", nobody else's
    vf_us = res.vps.set_index("vp")["vf_us"]
    assert vf_us[0] == pytest.approx(COMPLETE + HOP + ISSUE + DISPATCH + 2 * READ_GUEST)
    assert (vf_us.drop(0) == 0).all()
    assert res.summary["vf_block_reads"] == 2


def test_calls_faster_than_the_guest_reads_coalesce(tmp_path):
    # 20 calls 1 us apart, each a different block. The first is sent at once;
    # the other 19 arrive while the IOCTL is away (back at the host after
    # VMBUS + CANCELED + COMPLETE + HOP + ISSUE + VMBUS = 39 us) and go in one
    # notification.
    rows = [(1000.0 + i, 0, 1 << i) for i in range(20)]
    res = simulate(idle_vf_config(tmp_path, rows, vf__blocks=20), seed=0)
    vf = res.vf
    assert vf["notification"].tolist() == [0] + [1] * 19
    assert vf["coalesced"].tolist() == [1] + [19] * 19
    assert res.summary["vf_notifications"] == 2 < len(rows)
    assert res.summary["vf_coalescing_ratio"] == 10.0
    assert (vf["status"] == "read").all()  # every bit still delivered and read
    assert (vf["read_done_us"] > vf["pf_call_us"]).all()
    assert res.summary["vf_block_reads"] == 20
    ioctl_back = 1000.0 + VMBUS + CANCELED + COMPLETE + HOP + ISSUE + VMBUS
    assert vf["sent_us"].iloc[1] == pytest.approx(ioctl_back)


@pytest.mark.parametrize("seed", range(4))
def test_poisson_bursts_coalesce_and_lose_nothing(seed):
    # two VFs on two VPs, bursts of 4 calls, the PF busy with other OIDs;
    # invariants checked during the run (one IOCTL, in order, OR of calls)
    cfg = make_config(vf__count=2, vf__service_vps=[0, 5], vf__pf_call_rate_per_ms=5.0, vf__pf_burst_calls=4,
                      vf__blocks_per_call=2, vf__pf_other_oid_rate_per_ms=2.0, partition__duration_us=30000.0)
    res = simulate(cfg, seed=seed)
    s, vf = res.summary, res.vf
    assert s["vf_calls"] > 100 and s["vf_calls_lost"] == 0
    assert s["vf_coalescing_ratio"] > 1.5
    assert set(vf["status"]) <= {"read", "pending"}
    # pending: calls still on their way at the end (OIDs queue at the miniport under this load)
    assert (vf["status"] == "pending").mean() < 0.05
    assert s["pf_other_oids"] > 0
    # the service VPs, and only they, spent time on VF work
    vf_us = res.vps.set_index("vp")["vf_us"]
    assert vf_us[0] > 0 and vf_us[5] > 0 and vf_us.drop([0, 5]).sum() == 0


def test_delivery_waits_while_the_service_vp_is_descheduled(tmp_path):
    # 2 VPs on 1 LP, 10 ms slices: VP 0 runs 0-10 ms, VP 1 10-20 ms, VP 0 again
    # from 20 ms. A PF call at 12 ms reaches the guest at 12.015 ms but VP 0
    # only completes the IOCTL when the host runs it again.
    over = idle_vf_config(tmp_path, [(12000.0, 0, 0b1)], partition__vps=2, partition__lps=1,
                          partition__duration_us=30000.0)
    row = simulate(over, seed=0).vf.iloc[0]
    assert row.delivered_us == pytest.approx(20000.0 + COMPLETE)  # dispatched, not kicked: no Canceled exit
    assert row.latency_us > 8000.0
    dedicated = idle_vf_config(tmp_path, [(12000.0, 0, 0b1)], partition__vps=2, partition__lps=2,
                               partition__duration_us=30000.0)
    row = simulate(dedicated, seed=0).vf.iloc[0]
    assert row.delivered_us == pytest.approx(12000.0 + VMBUS + CANCELED + COMPLETE)


def test_reads_queue_behind_the_pfs_other_oids(tmp_path):
    rows = [(1000.0 + 500 * i, 0, 1) for i in range(40)]
    quiet = simulate(idle_vf_config(tmp_path, rows, partition__duration_us=30000.0), seed=0).vf
    busy = simulate(idle_vf_config(tmp_path, rows, partition__duration_us=30000.0,
                                   vf__pf_other_oid_rate_per_ms=10.0, vf__pf_other_oid_us=50.0), seed=0).vf
    assert quiet["latency_us"].nunique() == 1  # every call alike
    # a read that finds the PF busy waits for the residual of a 50 us OID
    assert busy["latency_us"].mean() > quiet["latency_us"].mean() + 5.0
    assert (busy["latency_us"] >= quiet["latency_us"].iloc[0] - 1e-9).all()


def test_fault_injection_drops_are_caught_by_the_checker(tmp_path):
    rows = [(1000.0 + 200 * i, 0, 1 << i) for i in range(10)]  # each call its own block: nothing masks a loss
    cfg = idle_vf_config(tmp_path, rows, vf__blocks=10, vf__drop_probability=0.5)
    with pytest.raises(InvariantError, match=r"never read afterwards; its notification \d+ was dropped"):
        simulate(cfg, seed=3)
    # with the checker off the loss is still reported, per call
    res = simulate(cfg.with_overrides({"run.check_invariants": False}), seed=3)
    vf = res.vf
    assert 0 < vf["dropped"].sum() < len(vf)
    assert (vf["dropped"] == (vf["status"] == "lost")).all()  # lost exactly where dropped
    assert res.summary["vf_calls_lost"] == vf["dropped"].sum() == res.summary["vf_notifications_dropped"]
    assert vf.loc[vf["dropped"], "read_done_us"].isna().all()


def test_a_drop_masked_by_a_later_call_of_the_same_block_is_not_a_loss(tmp_path):
    # the VF reads block 0 after both calls: its data is current, nothing lost
    rows = [(1000.0, 0, 1), (2000.0, 0, 1)]
    cfg = idle_vf_config(tmp_path, rows, vf__drop_probability=1.0)
    res = simulate(cfg.with_overrides({"vf.drop_probability": 0.0}), seed=0)
    assert (res.vf["status"] == "read").all()
    # every notification dropped: both calls lost, and the checker says so
    with pytest.raises(InvariantError, match="bit lost"):
        simulate(cfg, seed=0)


def test_checker_catches_an_invented_bit_and_a_second_ioctl(tmp_path, monkeypatch):
    from tlbsim.model import vf as vfmod

    original = vfmod.VirtualFunction.pf_call

    def corrupt_cache(self, mask):
        original(self, mask)
        self.cache |= 1 << 7  # a stack bug: a bit no PF call set

    cfg = idle_vf_config(tmp_path, [(1000.0, 0, 1)])
    monkeypatch.setattr(vfmod.VirtualFunction, "pf_call", corrupt_cache)
    with pytest.raises(InvariantError, match=r"carries 0x80 for calls \[\]"):
        simulate(cfg, seed=0)
    monkeypatch.undo()

    reissue = vfmod.VirtualFunction._issue_ioctl

    def twice(self):
        reissue(self)
        if self.delivered:
            reissue(self)

    monkeypatch.setattr(vfmod.VirtualFunction, "_issue_ioctl", twice)
    with pytest.raises(InvariantError, match="2 IOCTL_VPCI_INVALIDATE_BLOCK outstanding"):
        simulate(cfg, seed=0)


def test_vf_driver_flushes_interact_with_shootdowns(tmp_path):
    rows = [(1000.0 + 300 * i, 0, 0b11 if i % 2 else 0b10) for i in range(10)]
    cfg = idle_vf_config(tmp_path, rows, vf__flush_blocks=0b1, vf__flush_pages=4)
    res = simulate(cfg, seed=0)
    sd = res.shootdowns
    vf_sd = sd[sd["origin"] == "vf"]
    assert len(vf_sd) == 5  # one per notification naming block 0
    assert (vf_sd["initiator_vp"] == 0).all() and (vf_sd["pages"] == 4).all()
    assert (vf_sd["status"] == "SUCCESS").all() and (vf_sd["n_targets"] == 15).all()
    done = res.vf.loc[res.vf["block_mask"] & 1 == 1, "read_done_us"].to_numpy()
    assert np.allclose(np.sort(vf_sd["issue_us"].to_numpy()), np.sort(done))


def test_vf_off_by_default_and_same_seed_same_tables():
    cfg = make_config(partition__duration_us=10000.0)
    res = simulate(cfg, seed=1)
    assert len(res.vf) == 0 and "vf_calls" not in res.summary
    on = make_config(vf__count=2, partition__duration_us=20000.0, vf__pf_call_rate_per_ms=3.0)
    a, b = simulate(on, seed=9), simulate(on, seed=9)
    assert a.vf.equals(b.vf) and a.shootdowns.equals(b.shootdowns)
    c = simulate(on, seed=10)
    assert not a.vf["pf_call_us"].equals(c.vf["pf_call_us"])


@pytest.mark.parametrize(("override", "key"), [
    ("vf.blocks=65", "vf.blocks"),
    ("vf.hot_blocks=20", "vf.hot_blocks"),
    ("vf.drop_probability=1.5", "vf.drop_probability"),
    ("vf.vmbus_message_us=-1", "vf.vmbus_message_us"),
    ("vf.flush_blocks=0x10000", "vf.flush_blocks"),
])
def test_bad_vf_config_names_the_key(override, key, capsys):
    from pathlib import Path
    default = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "default.toml"
    assert main(["run", str(default), "--set", "vf.count=1", "--set", override]) == 2
    assert key in capsys.readouterr().err
    with pytest.raises(ConfigError):
        make_config(vf__count=1, vf__service_vps=[16])


def test_bad_vf_trace_lines_are_named(tmp_path):
    bad = tmp_path / "bad.csv"
    for text, needle in [("time_us,vf,block_mask\n10,0,0x10000\n", ":2: block_mask"),
                         ("time_us,vf,block_mask\n10,3,1\n", ":2: time must be"),
                         ("time_us,vf\n10,0\n", "needs a header"),
                         ("time_us,vf,block_mask\nx,0,1\n", ":2: expected numbers")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            simulate(quiet_config(vf__count=1, vf__trace=str(bad)), seed=0)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(1, 3), lps=st.integers(2, 8), rate=st.sampled_from([0.5, 5.0, 40.0]),
       burst=st.integers(1, 4), per_call=st.integers(1, 3), other=st.sampled_from([0.0, 2.0]),
       policy=st.sampled_from(["ipi", "mask", "linux", "kvm-pv"]), flush=st.booleans(), seed=st.integers(0, 10**6))
def test_vf_chain_properties_hold_for_random_configs(count, lps, rate, burst, per_call, other, policy, flush, seed):
    cfg = make_config(partition__vps=8, partition__lps=lps, partition__duration_us=8000.0, workload__policy=policy,
                      vf__count=count, vf__service_vps=[0, 3, 7], vf__pf_call_rate_per_ms=rate,
                      vf__pf_burst_calls=burst, vf__blocks_per_call=per_call, vf__pf_other_oid_rate_per_ms=other,
                      vf__flush_blocks=1 if flush else 0, locks__vsm_rate_per_ms=0.5)
    res = simulate(cfg, seed=seed)  # invariants checked during the run
    vf = res.vf
    assert (vf["status"] != "lost").all()
    sent = vf[vf["notification"] >= 0]
    assert (sent["sent_us"] >= sent["pf_call_us"]).all()
    delivered = sent[sent["delivered_us"].notna()]
    assert (delivered["delivered_us"] >= delivered["sent_us"]).all()
    read = vf[vf["status"] == "read"]
    assert (read["read_done_us"] >= read["pf_call_us"]).all()
    for _, g in sent.groupby("vf"):
        seqs = g["notification"].to_numpy()
        assert (np.diff(seqs) >= 0).all()  # calls go out in order, notification numbers without gaps
        assert set(seqs) == set(range(seqs.max() + 1))
        assert (g.groupby("notification").size() == g.groupby("notification")["coalesced"].first()).all()
    # only the service VPs of the configured VFs did VF work
    busy = set(res.vps.loc[res.vps["vf_us"] > 0, "vp"])
    assert busy <= {[0, 3, 7][i % 3] for i in range(count)}
