"""What a user reads: timelines that tile the run, every arrival a row, target-column identities, and
latency anatomy columns that sum to each row's latency (issue: what a user reads must be true)."""

import itertools

import numpy as np
import pytest

from tests.conftest import make_config
from tlbsim import simulate
from tlbsim.model.accounting import GUEST, VpState
from tlbsim.model.recorder import ANATOMY_COLUMNS, ANATOMY_PARTS
from tlbsim.model.timeline import Timeline

POLICIES = ("ipi", "mask", "all", "linux", "kvm-pv")
PROFILES = ("tlfs", "kvm", "openhcl")


@pytest.mark.parametrize("policy,profile", list(itertools.product(POLICIES, PROFILES)))
def test_timeline_segments_tile_the_run_for_every_vp(policy, profile):
    """Every VP's timeline segments cover the whole window with no gap and no overlap, and its guest
    segments add up to the guest time the vps table reports (a fast path that moved the clock without
    telling the timeline lost 1,245 of 2,000 us per VP under mask)."""
    duration = 3000.0
    config = make_config(workload__policy=policy, partition__semantics=profile, partition__vps=8,
                         partition__lps=4, partition__duration_us=duration, workload__rate_per_ms=2.0,
                         locks__vsm_rate_per_ms=1.0 if profile != "kvm" else 0.0)
    timeline = Timeline(0.0, duration)
    res = simulate(config, seed=3, timeline=timeline)
    segments = {}
    for vp, state, a, b, _ in timeline.segments:
        segments.setdefault(vp, []).append((a, b, state))
    vps = res.vps.set_index("vp")
    for vp in range(8):
        segs = sorted(segments[vp])
        assert segs[0][0] == 0.0 and segs[-1][1] == pytest.approx(duration, abs=1e-9)
        for (_, b, _), (a, _, _) in zip(segs, segs[1:], strict=False):
            assert a == pytest.approx(b, abs=1e-9), f"VP {vp}: gap or overlap at {b} us"
        guest = sum(b - a for a, b, s in segs if s == GUEST)
        row = vps.loc[vp]
        assert guest == pytest.approx(row["guest_us"] + row["hv_flush_us"] + row["refill_us"], rel=1e-9, abs=1e-6)
        for state in VpState:
            if state == GUEST:
                continue
            spent = sum(b - a for a, b, s in segs if s == state)
            assert spent == pytest.approx(row[f"{state.name.lower()}_us"], rel=1e-9, abs=1e-6), state.name


@pytest.mark.parametrize("cotenants", [0, 3])
def test_every_arrival_gets_a_row_whatever_the_policy(cotenants):
    """Under overcommit arrivals that no VP had started at the end vanished (14 % of mask's at the
    headline setting with 3 co-tenants), so the policies' statistics described different requests.
    Now every policy has one row per arrival: the same count, the same arrival times."""
    rows = {}
    for policy in POLICIES:
        config = make_config(workload__policy=policy, partition__lps=4, partition__duration_us=20000.0,
                             host__cotenants=cotenants, host__cotenant_vps=4)
        sd = simulate(config, seed=5).shootdowns
        rows[policy] = sd
        queued = sd[sd["status"] == "QUEUED"]
        assert queued["issue_us"].isna().all() and queued["latency_us"].isna().all()
        assert (queued["queue_us"] == 20000.0 - queued["arrival_us"]).all()
    first = rows[POLICIES[0]]
    for policy, sd in rows.items():
        workload = sd[sd["origin"] == "workload"]
        assert np.array_equal(np.sort(workload["arrival_us"].to_numpy()),
                              np.sort(first[first["origin"] == "workload"]["arrival_us"].to_numpy())), policy
    assert sum((sd["status"] == "QUEUED").sum() for sd in rows.values()) > 0  # the case this test is about


def test_queued_arrivals_count_as_incomplete_and_in_the_response_time():
    config = make_config(workload__policy="mask", partition__lps=2, partition__duration_us=20000.0)
    res = simulate(config, seed=5)
    sd, s = res.shootdowns, res.summary
    queued = int((sd["status"] == "QUEUED").sum())
    in_flight = int((sd["status"] == "INCOMPLETE").sum())
    assert queued > 0 and s["shootdowns_queued"] == queued
    assert s["incomplete_fraction"] == pytest.approx((queued + in_flight) / len(sd))
    # the response time's denominator is every arrival; each unfinished one counts with its delay so far
    done = sd[sd["status"] == "SUCCESS"]
    response = np.concatenate([(done["queue_us"] + done["latency_us"]).to_numpy(),
                               sd.loc[sd["status"] == "QUEUED", "queue_us"].to_numpy(),
                               (sd.loc[sd["status"] == "INCOMPLETE", "queue_us"]
                                + 20000.0 - sd.loc[sd["status"] == "INCOMPLETE", "issue_us"]).to_numpy()])
    assert s["response_p99_us"] == pytest.approx(np.percentile(response, 99))


@pytest.mark.parametrize("policy,profile,extra", [
    ("ipi", "tlfs", {}), ("kvm-pv", "kvm", {}), ("mask", "tlfs", {"locks.vsm_rate_per_ms": 2.0}),
    ("all", "tlfs", {"guest.lazy_tlb": "on"}), ("linux", "tlfs", {}), ("linux", "kvm", {}),
    ("mask", "openhcl", {"locks.vsm_rate_per_ms": 2.0}), ("mask", "tlfs", {"host.broadcast_flush": "invlpgb"}),
    ("all", "tlfs", {"host.broadcast_flush": "rar", "workload.pages": 64}),
    ("ipi", "tlfs", {"partition.apic_emulation": "user", "spin.mode": "ple"}),
])
def test_anatomy_adds_up_to_latency_and_target_columns_obey_their_identity(policy, profile, extra):
    """Each row's anatomy columns add up to its latency (its elapsed time for one in flight at the
    end), fanout_us is a part of hypercall_us, and each completed row reached every target in exactly
    one way: n_targets = running_targets + deferred_targets + off_lp_targets. The model checks these
    as invariants (run.check_invariants); this recomputes them from the table."""
    config = make_config(workload__policy=policy, partition__semantics=profile, partition__lps=6,
                         partition__duration_us=20000.0, **{k.replace(".", "__"): v for k, v in extra.items()})
    sd = simulate(config, seed=2).shootdowns
    issued = sd[sd["status"] != "QUEUED"]
    elapsed = np.where(issued["status"] == "INCOMPLETE", 20000.0 - issued["issue_us"], issued["latency_us"])
    parts = issued[list(ANATOMY_PARTS)].sum(axis=1).to_numpy()
    np.testing.assert_allclose(parts, elapsed, rtol=1e-9, atol=1e-6)
    assert (issued[list(ANATOMY_COLUMNS)] >= -1e-9).all().all()
    assert (issued["fanout_us"] <= issued["hypercall_us"] + 1e-9).all()
    done = issued[issued["status"] == "SUCCESS"]
    assert (done["n_targets"] == done["running_targets"] + done["deferred_targets"] + done["off_lp_targets"]).all()
    with_targets = done[done["n_targets"] > 0]
    assert len(with_targets), "no shootdown had a target: the identity was not exercised"
    if policy in ("ipi", "kvm-pv"):  # IPI targets on their LP are running targets (always 0 before)
        assert with_targets["running_targets"].sum() > 0


def test_anatomy_of_a_dedicated_mask_call_is_its_closed_form():
    """One VP's mask call with every VP running and no exits: the anatomy is the hand-worked cost
    split (local flush, hypercall = entry + decode + walk + fan-out, fan-out = sends + one slowest
    acknowledgement), nothing else."""
    from tests.conftest import quiet_config

    config = quiet_config(workload__policy="mask", partition__vps=4, partition__lps=4, workload__initiators=[0],
                          partition__duration_us=3000.0, workload__pages=1)
    res = simulate(config, seed=1)
    c = config.costs
    row = res.shootdowns[res.shootdowns["status"] == "SUCCESS"].iloc[0]
    fanout = c.hv_ipi_send_us * 3 + c.hv_ipi_roundtrip_us + c.target_interrupt_us + c.invlpg_us
    entry = c.vmexit_roundtrip_us + c.hypercall_decode_us + c.mask_per_vp_us * 3 + c.list_per_range_us
    assert row["local_flush_us"] == pytest.approx(c.local_flush_cost_us(1))
    assert row["fanout_us"] == pytest.approx(fanout)
    assert row["hypercall_us"] == pytest.approx(entry + fanout)
    assert row["latency_us"] == pytest.approx(c.local_flush_cost_us(1) + entry + fanout)
    for col in ("ipi_send_us", "spinning_us", "suspended_us", "descheduled_us", "interrupts_us", "other_us"):
        assert row[col] == pytest.approx(0.0, abs=1e-9), col


def test_in_flight_calls_are_charged_only_the_time_that_elapsed():
    """A decode longer than the run: the row's hypercall time and the summary's shootdown cost stay
    within the run (they were charged the whole call up front: a time fraction of 7.6)."""
    config = make_config(workload__policy="mask", partition__duration_us=600.0,
                         costs__hypercall_decode_us=1000.0)
    res = simulate(config, seed=1)
    s = res.summary
    assert (res.shootdowns["status"] == "INCOMPLETE").any()  # calls under way at the end: the case
    assert (res.shootdowns["hypercall_us"].fillna(0) <= 600.0 + 1e-9).all()
    assert s["shootdown_time_fraction"] <= 1.0 + 1e-9
    assert s["shootdown_refill_us"] <= s["refill_us"] + 1e-9


# ------------------------------------------------------------ tlbsim explain and the anatomy figure
def _small_overcommit_sweep(tmp_path):
    from tlbsim.sweep import SweepSpec, run_sweep

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    spec = SweepSpec.from_dict({
        "name": "anatomy", "base": str(root / "experiments" / "configs" / "default.toml"), "replications": 1,
        "seed": 7, "fixed": {"partition.vps": 8, "partition.lps": 8, "partition.duration_us": 15000.0},
        "grid": {"workload.policy": ["ipi", "mask"], "host.guests": [1, 2]}, "plot": {"kind": "overcommit"}})
    out = tmp_path / "sweep"
    assert not run_sweep(spec, out, jobs=1, progress=False).failed
    return out


def test_anatomy_bands_add_up_and_the_figure_stacks_them(tmp_path):
    from tlbsim.anatomy import STACK, anatomy_figure, sweep_anatomy
    from tlbsim.plots import load_sweep

    out = _small_overcommit_sweep(tmp_path)
    points, shootdowns, _ = load_sweep(out)
    table = sweep_anatomy(points, shootdowns, ["vps_per_lp", "workload.policy"])
    assert len(table) == 2 * 2 * 2  # levels x policies x bands
    np.testing.assert_allclose(table[list(STACK)].sum(axis=1), table["elapsed_us"], rtol=1e-9)
    # the tail band is at least the typical one, in every group
    wide = table.pivot_table(index=["vps_per_lp", "workload.policy"], columns="band", values="elapsed_us")
    assert (wide["tail"] >= wide["typical"]).all()
    paths = anatomy_figure(table, "vps_per_lp", tmp_path / "fig")
    assert {p.suffix for p in paths} == {".png", ".svg"} and all(p.stat().st_size > 0 for p in paths)


def test_explain_prints_the_anatomy_of_a_run_and_of_a_sweep(tmp_path, capsys):
    from tlbsim.cli import main

    out = _small_overcommit_sweep(tmp_path)
    assert main(["explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vps_per_lp = 2.0, workload.policy = mask" in text and "typical (p40-p60)" in text
    assert "IPI sends" in text and "latency (sum)" in text
    run_dir = tmp_path / "run"
    default = __import__("pathlib").Path(__file__).resolve().parents[1] / "experiments" / "configs" / "default.toml"
    assert main(["run", str(default), "--set", "partition.duration_us=3000", "--out", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["explain", str(run_dir)]) == 0
    assert "policy = mask" in capsys.readouterr().out
    assert main(["explain", str(tmp_path / "nothing")]) == 2
    assert "no tlbsim results" in capsys.readouterr().err


def test_make_run_s_commands_succeed_twice(tmp_path, capsys):
    """The README: `make run` is idempotent. Its recipe's tlbsim commands (read from the Makefile), run
    twice into a scratch directory on a shrunk headline spec, both exit 0; the second resumes the sweep."""
    import re
    import shlex
    import tomllib
    from pathlib import Path

    from tlbsim.cli import main

    root = Path(__file__).resolve().parents[1]
    recipe = re.search(r"^run: .*\n((?:\t.*\n)+)", (root / "Makefile").read_text(), re.M).group(1)
    commands = [shlex.split(line.strip().replace("$(BIN)/tlbsim", "tlbsim")) for line in recipe.splitlines()]
    assert [c[1] for c in commands] == ["run", "sweep", "plot"]
    spec = tomllib.loads((root / "experiments" / "overcommit.toml").read_text())
    small = tmp_path / "overcommit.toml"
    small.write_text("\n".join([
        f'name = "{spec["name"]}"', f'base = "{root / "experiments" / spec["base"]}"', "replications = 1",
        f"seed = {spec['seed']}", "[fixed]", '"partition.vps" = 4', '"partition.lps" = 4',
        '"partition.duration_us" = 3000.0', "[grid]", '"workload.policy" = ["ipi", "mask"]',
        '"host.guests" = [1, 2]', "[plot]", 'kind = "overcommit"']))
    swap = {"experiments/configs/default.toml": str(root / "experiments" / "configs" / "default.toml"),
            "experiments/overcommit.toml": str(small), "results/default": str(tmp_path / "default"),
            "results/overcommit": str(tmp_path / "overcommit")}
    for attempt in range(2):
        for command in commands:
            argv = [swap.get(a, a) for a in command[1:]] + (["--no-progress"] if command[1] == "sweep" else [])
            assert main(argv) == 0, (attempt, argv)
    assert "4 resumed" in capsys.readouterr().out
    assert (tmp_path / "overcommit" / "figures" / "latency_anatomy.png").exists()


def test_an_exit_under_way_at_the_end_counts_only_the_time_it_had():
    """A 1 ms MemoryAccess-free exit mix of one 5 ms exit reason in a 2 ms run: the exits table's time
    and the VP's exit state agree (the exit's whole cost was counted when it started)."""
    from tests.conftest import QUIET_EXITS

    config = make_config(**{k.replace(".", "__"): v for k, v in QUIET_EXITS.items()},
                         exits__x64_io_port_access={"rate_per_ms": 2.0, "cost_us": 5000.0},
                         partition__duration_us=2000.0, partition__vps=4, workload__rate_per_ms=0.0)
    res = simulate(config, seed=1)
    exit_time = res.exits.groupby("vp")["time_us"].sum()
    np.testing.assert_allclose(exit_time.to_numpy(), res.vps.set_index("vp")["exit_us"].to_numpy(), rtol=1e-12)
    assert (exit_time <= 2000.0).all() and exit_time.max() > 0


def test_the_kick_before_another_shootdown_s_handler_is_interrupt_time():
    """With no exit drawn at all, nothing of an IPI initiator's latency is 'other': the interruption
    (or, with a user-mode APIC, the Canceled exit) before a handler it runs for another shootdown while
    it spins is interrupts_us, with the handler."""
    from tests.conftest import QUIET_EXITS

    quiet = {k.replace(".", "__"): v for k, v in QUIET_EXITS.items()}
    for apic in ("hypervisor", "user"):
        config = make_config(workload__policy="ipi", partition__apic_emulation=apic, partition__duration_us=20000.0,
                             workload__rate_per_ms=2.0, **quiet)
        sd = simulate(config, seed=3).shootdowns
        issued = sd[sd["status"] != "QUEUED"]
        assert issued["interrupts_us"].sum() > 0
        assert issued["other_us"].abs().max() < 1e-9, apic


def test_replications_count_never_started_arrivals_as_unfinished(capsys):
    from pathlib import Path

    from tlbsim.cli import main

    default = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "default.toml"
    assert main(["run", str(default), "--set", "partition.lps=1", "--set", "partition.duration_us=20000",
                 "--replications", "2", "--no-progress"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("incomplete_fraction"))
    assert float(line.split()[1]) > 0.5  # most arrivals never started on one LP


def test_plot_and_explain_cope_with_older_tables_and_replication_indexes(tmp_path, capsys):
    """A sweep made before the anatomy columns still plots (without the anatomy figure); explain on a
    `run --replications N --out` directory names a replication to explain instead of failing."""
    from pathlib import Path

    import pandas as pd

    from tlbsim.cli import main
    from tlbsim.model.recorder import ANATOMY_COLUMNS
    from tlbsim.plots import plot_sweep

    out = _small_overcommit_sweep(tmp_path)
    table = out / "shootdowns.parquet"
    pd.read_parquet(table).drop(columns=[c for c in ANATOMY_COLUMNS if c != "hypercall_us"]).to_parquet(table)
    names = {p.name for p in plot_sweep(out, tmp_path / "fig")}
    assert "latency_vs_overcommit.png" in names and "latency_anatomy.png" not in names
    default = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "default.toml"
    reps = tmp_path / "reps"
    assert main(["run", str(default), "--set", "partition.duration_us=2000", "--replications", "2",
                 "--out", str(reps), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["explain", str(reps)]) == 2
    assert "replication-0" in capsys.readouterr().err
