"""Fuzz what runs report, not only how they exit (issue 24 item 10). Random valid configurations (every
policy and hypervisor profile, open and closed loops, co-tenants and guests, VSM and MemoryAccess locks,
exits, VFs, hardware broadcast, workload traces) run with the model's invariants on, and their outputs
must hold together:

- every VP's time by state sums to the run's duration;
- no figure is inf or negative, and none is NaN but a statistic of nothing (a latency with no
  shootdown, a VF latency with no call read, a time per operation with no operation);
- no time is beyond the run: a row's times and a VP's times lie in [0, duration], a latency statistic
  is at most the duration, a fraction at most 1, what shootdowns cost at most the VPs' time;
- the shootdown table's rows equal the summary's counts, and every trace arrival before the end is a row.

The suite runs a derandomized subset (TLBSIM_FUZZ_EXAMPLES examples per test, default 50: about half a
minute on two cores); `make fuzz` runs 1,000 with fresh randomness (TLBSIM_FUZZ_RANDOM=1).
"""

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from tlbsim import Config, ConfigError
from tlbsim.config import COST_LIMITS_US, POLICIES
from tlbsim.model.accounting import TIME_COLUMNS
from tlbsim.model.partition import EventBudgetExceeded, address_space_index
from tlbsim.runner import simulate

EXAMPLES = int(os.environ.get("TLBSIM_FUZZ_EXAMPLES", "50"))
# no shrinking: a failure is reported as found (its overrides and seed are in the message), at once
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("TLBSIM_FUZZ_RANDOM"),
                phases=(Phase.explicit, Phase.reuse, Phase.generate), print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])
EPS = 1e-9  # relative tolerance of sums of floating-point times


def draw_overrides(data, costs: str) -> dict:
    """A valid small configuration; ``costs``: "default" (the calibrated values), "plausible" (each
    drawn costs inside docs/calibration.md's plausible range) or "bounds" (up to the accepted bounds)."""
    d = data.draw
    vps = d(st.integers(1, 12), "vps")
    o = {"partition.vps": vps, "partition.lps": d(st.integers(1, 12), "lps"),
         "partition.duration_us": d(st.sampled_from([500.0, 2000.0, 5000.0]), "duration"),
         "workload.policy": d(st.sampled_from(POLICIES), "policy"),
         "workload.rate_per_ms": d(st.sampled_from([0.05, 0.5, 2.0, 8.0]), "rate"),
         "workload.pages": d(st.sampled_from([1, 4, 33, 40, 600]), "pages"),
         "workload.full_flush_fraction": d(st.sampled_from([0.0, 0.0, 0.3, 1.0]), "full"),
         "workload.sharing": d(st.sampled_from(["all", "groups", "private"]), "sharing"),
         "workload.group_size": d(st.integers(1, 6), "group"),
         "workload.burst_size": d(st.sampled_from([1, 1, 3]), "burst"),
         "partition.semantics": d(st.sampled_from(["tlfs", "kvm", "openhcl"]), "semantics"),
         "host.cotenants": d(st.sampled_from([0, 0, 1, 2]), "cotenants"),
         "host.cotenant_vps": d(st.integers(1, 6), "cotenant_vps"),
         "host.cotenant_load": d(st.sampled_from(["cpu", "duty"]), "load"),
         "locks.vsm_rate_per_ms": d(st.sampled_from([0.0, 0.0, 2.0]), "vsm"),
         "locks.wait": d(st.sampled_from(["profile", "reissue", "snapshot"]), "wait"),
         "exits.memory_access.rate_per_ms": d(st.sampled_from([0.0, 0.5, 5.0]), "mmio"),
         "exits.x64_halt.rate_per_ms": d(st.sampled_from([0.0, 0.2, 2.0]), "halt"),
         "spin.mode": d(st.sampled_from(["profile", "ple", "notify", "off"]), "spin"),
         "guest.lazy_tlb": d(st.sampled_from(["auto", "on", "off"]), "lazy"),
         "guest.call_form": d(st.sampled_from(["list", "space"]), "form"),
         "run.check_invariants": True, "run.max_events": 300_000}
    if d(st.booleans(), "closed"):
        o["workload.mode"] = "closed"
        o["workload.closed_work_us"] = d(st.sampled_from([20.0, 200.0]), "work")
        o["workload.sleep_us"] = d(st.sampled_from([0.0, 50.0]), "sleep")
    if d(st.integers(0, 3), "threads?") == 0:
        o["workload.threads"] = d(st.integers(1, vps), "threads")
    if d(st.integers(0, 3), "guests?") == 0:
        o["host.guests"] = 2
        o["host.guest_policies"] = [d(st.sampled_from(POLICIES), "guest_policy")]
    if d(st.integers(0, 3), "vf?") == 0:
        o["vf.count"] = d(st.integers(1, 2), "vfs")
        o["vf.flush_blocks"] = d(st.sampled_from([0, 1]), "vf_flush")  # (not drop_probability: a fault)
    if o["partition.semantics"] == "openhcl":
        o["partition.isolation"] = d(st.sampled_from(["snp", "tdx"]), "isolation")
    else:
        o["host.broadcast_flush"] = d(st.sampled_from(["none", "none", "invlpgb", "rar"]), "broadcast")
        if d(st.booleans(), "user_apic"):
            o["partition.apic_emulation"] = "user"
        else:
            o["costs.posted_interrupts"] = d(st.booleans(), "posted")
    if costs != "default":
        keys = d(st.lists(st.sampled_from(sorted(COST_LIMITS_US)), max_size=4, unique=True), "cost keys")
        for key in keys:
            top = COST_LIMITS_US[key] if costs == "bounds" else 3 * getattr(Config().costs, key)
            o[f"costs.{key}"] = d(st.sampled_from([0.0, top, top / 7]), key)
        if costs == "bounds":  # and an IPI's cost at its bound
            key = d(st.sampled_from(["vipi_send_us", "pv_ipi_per_target_us", "hv_ipi_send_us",
                                     "target_interrupt_us"]), "ipi cost")
            o[f"costs.{key}"] = COST_LIMITS_US[key]
    return o


def write_trace(data, config: Config, path) -> int:
    """A valid workload trace (own address spaces, threads' VPs), some rows after the end; returns how
    many rows fall before the end (each must be a shootdown row, in every guest)."""
    threads = config.workload.threads or config.partition.vps
    duration = config.partition.duration_us
    rows = data.draw(st.lists(st.tuples(st.floats(0, duration * 1.2), st.integers(0, threads - 1),
                                        st.integers(0, 64)), min_size=1, max_size=12), "trace rows")
    lines = ["time_us,vp,address_space,pages", ""]  # a blank line too: it is skipped
    lines += [f"{t!r},{vp},{address_space_index(config, vp)},{pages}" for t, vp, pages in rows]
    path.write_text("\n".join(lines) + "\n")
    return sum(1 for t, _, _ in rows if t < duration)


def nan_allowed(key: str, result) -> bool:
    """A NaN summary figure is a statistic of nothing."""
    s, sd = result.summary, result.shootdowns
    if key.startswith("vf_"):
        return not len(result.vf) or not (result.vf["status"] == "read").any() or not s.get("vf_notifications")
    if key == "guest_system_us_per_op":
        return not s["ops_per_s"]
    if key == "cost_per_shootdown_us":
        return not (sd["status"] != "QUEUED").any()
    if key.startswith("latency_"):  # completed ones, and those in flight with their time so far
        return not sd["status"].isin(["SUCCESS", "INCOMPLETE"]).any()
    if key.startswith("response_"):  # every arrival but a failed call
        return not sd["status"].isin(["SUCCESS", "INCOMPLETE", "QUEUED"]).any()
    if key.startswith("queue_"):  # the completed ones
        return not (sd["status"] == "SUCCESS").any()
    return False


#: shootdown columns that are NaN where the row's status says the moment never came
UNSET = {"issue_us": {"QUEUED"}, "complete_us": {"QUEUED", "INCOMPLETE"}, "latency_us": {"QUEUED", "INCOMPLETE"}}


def problems(result) -> list[str]:
    """Every way the outputs of ``result`` do not hold together (empty: they do)."""
    s, sd, vps = result.summary, result.shootdowns, result.vps
    d = float(s["duration_us"])
    slack = EPS * max(d, 1.0)
    out = []
    total = sum(vps[f"{c}_us"] for c in TIME_COLUMNS)
    if not np.allclose(total, d, rtol=EPS, atol=1e-6):
        out.append(f"VP time by state sums to {sorted(set(total.round(6)))}, not {d}")
    for c in (c for c in vps.columns if c.endswith("_us")):
        x = vps[c].to_numpy(dtype=float)
        if not np.isfinite(x).all() or (x < -slack).any() or (x > d + slack).any():
            out.append(f"vps.{c} outside [0, {d}]: {np.nanmin(x)} .. {np.nanmax(x)}")
    for key, v in s.items():
        if isinstance(v, bool | str | np.bool_) or v is None:
            continue
        v = float(v)
        if math.isnan(v):
            if not nan_allowed(key, result):
                out.append(f"summary {key} is NaN")
        elif math.isinf(v) or v < -slack:
            out.append(f"summary {key} = {v}")
        elif "fraction" in key and v > 1 + EPS:
            out.append(f"summary {key} = {v} > 1")
        elif key in vps.columns and key.endswith("_us") and v > d * len(vps) * (1 + EPS):
            out.append(f"summary {key} = {v} beyond the VPs' time ({len(vps)} x {d})")
        elif key.startswith(("latency_", "response_", "queue_")) and key.endswith("_us") and v > d + slack:
            out.append(f"summary {key} = {v} beyond the run ({d})")
    if float(s["shootdown_cost_us"]) > d * len(vps) * (1 + EPS):
        out.append(f"shootdown_cost_us = {s['shootdown_cost_us']} beyond the VPs' time ({len(vps)} x {d})")
    status = sd["status"].astype(str)
    for c in (c for c in sd.columns if sd[c].dtype.kind == "f"):
        x = sd[c].to_numpy()
        nan = np.isnan(x)
        if nan.any() and not set(status[nan]) <= UNSET.get(c, set()):
            out.append(f"shootdowns.{c} is NaN in rows {sorted(set(status[nan]))}")
        x = x[~nan]
        if np.isinf(x).any() or (x < -slack).any():
            out.append(f"shootdowns.{c} negative or inf: min {x.min()}")
        if c.endswith("_us") and (x > d + slack).any():
            out.append(f"shootdowns.{c} beyond the run: {x.max()} > {d}")
    counted = sum(int(s[k]) for k in ("shootdowns_completed", "shootdowns_failed", "shootdowns_incomplete",
                                     "shootdowns_queued"))
    if counted != len(sd):
        out.append(f"{len(sd)} shootdown rows, but the summary counts {counted}")
    return out


def run_or_skip(overrides: dict, seed: int):
    try:
        config = Config().with_overrides(overrides)
    except ConfigError:
        assume(False)  # a combination the configuration refuses (checked elsewhere)
    try:
        return config, simulate(config, seed=seed)
    except EventBudgetExceeded:
        assume(False)


@FUZZ
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_fuzzed_runs_report_outputs_that_hold_together(tmp_path_factory, data, seed):
    overrides = draw_overrides(data, data.draw(st.sampled_from(["default", "plausible"]), "costs"))
    expected = None
    if data.draw(st.integers(0, 3), "trace?") == 0:
        config = Config().with_overrides(overrides)
        path = tmp_path_factory.mktemp("trace") / "t.csv"
        expected = write_trace(data, config, path) * config.host.guests
        overrides["workload.trace"] = str(path)
    _, result = run_or_skip(overrides, seed)
    found = problems(result)
    if expected is not None:
        arrivals = int((result.shootdowns["origin"] == "workload").sum())
        if arrivals != expected:
            found.append(f"{expected} trace arrivals before the end, {arrivals} workload rows")
    if found:
        pytest.fail("\n".join([*found, f"with {overrides}, seed {seed}"]), pytrace=False)


IPI_SENDS_CHARGED_WHOLE = (
    "model side of issue 24 item 5, not done yet: an IPI send (a trapped ICR write, a PV send-IPI hypercall) is "
    "added to vps.ipi_send_us whole when it starts (model/guest.py), so a send still under way at the end is "
    "charged beyond the run (9,000 us of sends by 4 VPs in a 2,000 us run, shootdown_time_fraction 1.13), and "
    "at costs near the bounds ipi_send_us overlaps the VP's other states (5,000 us of sends on a VP that also ran "
    "500 us of guest code in a 5,000 us run: shootdown_cost_us beyond the VPs' time)")


@pytest.mark.parametrize("overrides", [
    {"workload.policy": "kvm-pv", "partition.semantics": "kvm", "costs.pv_ipi_per_target_us": 1000.0},
    {"workload.policy": "ipi", "costs.vipi_send_us": 1000.0},
], ids=["pv-send-ipi", "trapped-icr"])
def test_ipi_sends_under_way_at_the_end_are_charged_only_the_time_elapsed(overrides):
    """An IPI send (or any exit) under way at the end is counted only as far as it went (VP.trim_charges)."""
    config = Config().with_overrides({"partition.vps": 4, "partition.duration_us": 2000.0,
                                      "run.check_invariants": True, **overrides})
    assert not problems(simulate(config, seed=1))


@FUZZ
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_fuzzed_runs_at_the_cost_bounds_spend_no_time_beyond_the_run(data, seed):
    overrides = draw_overrides(data, "bounds")
    _, result = run_or_skip(overrides, seed)
    found = problems(result)
    if found:
        pytest.fail("\n".join([*found, f"with {overrides}, seed {seed}"]), pytrace=False)


def test_the_checks_catch_nonsense():
    """The checker is not vacuous: outputs made wrong one way at a time are caught."""
    config = Config().with_overrides({"partition.duration_us": 2000.0, "partition.vps": 4})
    for spoil, words in ((lambda r: r.vps.loc.__setitem__((0, "guest_us"), r.vps.loc[0, "guest_us"] + 1), "sums to"),
                         (lambda r: r.summary.__setitem__("shootdown_time_fraction", 1.2), "> 1"),
                         (lambda r: r.summary.__setitem__("latency_p99_us", math.inf), "latency_p99_us = inf"),
                         (lambda r: r.summary.__setitem__("guest_work_fraction", math.nan), "is NaN"),
                         (lambda r: r.shootdowns.loc.__setitem__((0, "latency_us"), 3000.0), "beyond the run"),
                         (lambda r: r.summary.__setitem__("shootdowns_completed", 10**6), "summary counts")):
        result = simulate(config, seed=3)
        assert not problems(result)
        spoil(result)
        assert any(words in p for p in problems(result)), words
