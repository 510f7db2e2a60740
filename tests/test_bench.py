"""The bench's bookkeeping (not its timings: performance is measured by `tlbsim bench`, never asserted in a
test): --compare flags what got slower, bad inputs fail before minutes of measuring, the naive peer
models what it says, and the committed reference run is one --compare can read."""

import json
from pathlib import Path

import pytest

from tlbsim.bench import compare_reports, load_report, naive_simpy_us_per_ms
from tlbsim.cli import main

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "reference.json"


def report(**figures):
    return {"meta": {"quick": False}, "figures": figures}


def test_compare_uses_the_ratio_to_the_floor_and_flags_only_real_regressions():
    ref = report(standard_wall_s={"value": 1.0, "floor": 0.5, "over_floor": 2.0, "better": "lower"},
                 sweep_speedup={"value": 1.8, "better": "higher"},
                 gone={"value": 3.0, "better": "lower"})
    new = report(standard_wall_s={"value": 3.0, "floor": 1.2, "over_floor": 2.5, "better": "lower"},
                 sweep_speedup={"value": 1.5, "better": "higher"},
                 added={"value": 1.0, "better": "lower"})
    rows = {r["figure"]: r for r in compare_reports(new, ref)}
    assert set(rows) == {"standard_wall_s", "sweep_speedup"}  # only figures both runs have
    wall = rows["standard_wall_s"]
    # a slower machine (value x3) is not the regression; the ratio to the floor (2.0 -> 2.5) is
    assert (wall["measure"], wall["ratio"], wall["regressed"]) == ("over_floor", 1.25, True)
    assert rows["sweep_speedup"]["regressed"]  # higher is better and it fell by 17 %
    within = compare_reports(report(sweep_speedup={"value": 1.75, "better": "higher"}), ref)
    assert not within[0]["regressed"]  # 3 % is noise on this machine
    loose = {r["figure"]: r for r in compare_reports(new, ref, tolerance=0.30)}
    assert not loose["standard_wall_s"]["regressed"] and not loose["sweep_speedup"]["regressed"]  # 25 %, 17 %
    assert compare_reports(new, ref, tolerance=0.20)[0]["regressed"]  # 25 % > 20 %


def test_compare_takes_times_without_a_floor_in_units_of_the_runs_raw_timeout():
    """A machine twice as slow doubles every time: that is not a regression, and the raw timeout
    itself is shown but never flagged."""
    ref = report(raw_simpy_timeout_us={"value": 0.75, "unit": "us"},
                 **{"marginal_wall_us_per_sd.mask": {"value": 39.0, "unit": "us", "better": "lower"}})
    slow = report(raw_simpy_timeout_us={"value": 1.5, "unit": "us"},
                  **{"marginal_wall_us_per_sd.mask": {"value": 78.0, "unit": "us", "better": "lower"}})
    rows = {r["figure"]: r for r in compare_reports(slow, ref)}
    assert rows["raw_simpy_timeout_us"]["measure"] == "machine" and not rows["raw_simpy_timeout_us"]["regressed"]
    mask = rows["marginal_wall_us_per_sd.mask"]
    assert mask["measure"] == "x_raw" and mask["ratio"] == pytest.approx(1.0) and not mask["regressed"]


def test_bad_reference_and_unwritable_json_fail_before_measuring(tmp_path, capsys):
    assert main(["bench", "--compare", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "other.json").write_text(json.dumps({"not": "a bench run"}))
    assert main(["bench", "--compare", str(tmp_path / "other.json")]) == 2
    assert "not a tlbsim bench" in capsys.readouterr().err
    assert main(["bench", "--json", str(tmp_path)]) == 2  # a directory
    for bad in ("0", "-5", "nan", "2000"):
        assert main(["bench", "--tolerance", bad]) == 2
    assert "--tolerance" in capsys.readouterr().err
    with pytest.raises(ValueError):
        load_report(tmp_path / "missing.json")


def test_naive_peer_is_deterministic_and_does_a_process_per_target_flush():
    _, events = naive_simpy_us_per_ms(4, 5000.0, seed=1)
    _, again = naive_simpy_us_per_ms(4, 5000.0, seed=1)
    _, more_vps = naive_simpy_us_per_ms(16, 5000.0, seed=1)
    assert events == again > 0
    assert more_vps > 4 * events  # shootdowns x targets: superlinear in VPs


def test_committed_reference_is_a_full_run_compare_can_read():
    ref = load_report(REFERENCE)
    assert ref["meta"]["quick"] is False
    for name in ("standard_wall_s", "cotenant_wall_s", "closed_loop_wall_s", "mask_15_targets_us",
                 "ipi_events_per_target", "naive_over_tlbsim.16", "large_partition_wall_s", "memory_peak_mb",
                 "skeleton_event_over_raw"):
        assert name in ref["figures"], name
    assert compare_reports(ref, ref) and not any(r["regressed"] for r in compare_reports(ref, ref))


def test_skeleton_runs_two_timeouts_a_step_and_nothing_else(monkeypatch):
    """The skeleton the bench sets beside the floor is what it says: per VP and step, one guest
    interval and one exit, each a single timeout (plus each process's start and end)."""
    from tlbsim import bench
    from tlbsim.model.partition import CountingEnvironment

    envs = []

    def counting():
        envs.append(CountingEnvironment())
        return envs[-1]

    monkeypatch.setattr(bench.simpy, "Environment", counting)
    assert bench.skeleton_event_us(4, 800) > 0
    assert envs[0].events_scheduled == 2 * 4 + 2 * (800 // 4 // 2) * 4
    assert envs[0].now > 0


def test_the_per_target_flush_figure_runs_against_the_hypervisor_as_it_is():
    """bench.target_flush_us drives Hypervisor.flush_targets directly: a signature change there must fail
    here, not in the middle of a 15-minute bench run."""
    from tlbsim.bench import target_flush_us

    for pages in (1, None):
        assert 0 < target_flush_us(n=60, repeats=1, pages=pages) < 1e5
