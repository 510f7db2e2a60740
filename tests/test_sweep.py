"""Sweeps: seeds and common random numbers, resume after a kill, atomic
writes, errors recorded per point, identical results on every executor."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tlbsim import ConfigError, load_results
from tlbsim.cli import main
from tlbsim.sweep import SweepSpec, run_sweep, run_task

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "name": "small",
    "base": str(ROOT / "experiments" / "configs" / "default.toml"),
    "replications": 2,
    "seed": 7,
    "fixed": {"partition.vps": 6, "partition.duration_us": 8000.0},
    "grid": {"workload.policy": ["mask", "all"]},
    "zip": {"workload.sharing": ["all", "groups"], "workload.group_size": [6, 2]},
}


def spec(**changes):
    return SweepSpec.from_dict({**SMALL, **changes})


def test_points_are_grid_times_zip_with_fixed_overrides():
    s = spec()
    assert len(s.points) == 4 and len(s.tasks()) == 8
    assert s.points[1].overrides == {"partition.vps": 6, "partition.duration_us": 8000.0,
                                     "workload.policy": "mask", "workload.sharing": "groups",
                                     "workload.group_size": 2}


def test_seeds_depend_on_replication_only_common_random_numbers():
    s = spec()
    assert s.seed_for(0) != s.seed_for(1) and s.seed_for(0) == spec().seed_for(0)
    # mask and all at the same point and replication see the same workload: same initiators at the same times
    a = run_task(s, 0, 1)["shootdowns"]
    b = run_task(s, 2, 1)["shootdowns"]
    assert a.arrival_us.tolist()[:20] == b.arrival_us.tolist()[:20]
    # a point recomputed alone gives the same rows
    pd.testing.assert_frame_equal(a, run_task(spec(), 0, 1)["shootdowns"])


def test_bad_specs_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="workload.policy"):
        spec(grid={"workload.policy": ["mask", "bogus"]})
    with pytest.raises(ConfigError, match="same length"):
        spec(zip={"workload.sharing": ["all"], "workload.group_size": [1, 2]})
    with pytest.raises(ConfigError, match="unknown"):
        SweepSpec.from_dict({**SMALL, "gird": {}})
    # a key in two tables: the later one would win without a word (the sweep ran half its points twice)
    with pytest.raises(ConfigError, match=r"grid\.partition\.vps: is also in \[fixed\]"):
        spec(fixed={"partition.vps": 8}, grid={"partition.vps": [4, 8]})
    with pytest.raises(ConfigError, match=r"zip\.workload\.policy: is also in \[grid\]"):
        spec(grid={"workload.policy": ["mask", "ipi"]}, zip={"workload.policy": ["all"]})


DERIVED = {
    "name": "derived",
    "base": str(ROOT / "experiments" / "configs" / "default.toml"),
    "seed": 3,
    "fixed": {"partition.duration_us": 1000.0, "total_rate_per_ms": 4.0},
    "grid": {"partition.vps": [8, 16], "active_fraction": [0.25, 1.0], "overcommit": [1, 2]},
    "derive": {"workload.threads": "max(1, round(partition.vps * active_fraction))",
               "workload.rate_per_ms": "total_rate_per_ms / workload.threads",
               "partition.lps": "max(1, workload.threads // overcommit)"},
}


def test_derived_keys_follow_the_study_parameters_in_order():
    s = SweepSpec.from_dict(DERIVED)
    assert len(s.points) == 8
    by = {(p.overrides["partition.vps"], p.params["active_fraction"], p.params["overcommit"]): p for p in s.points}
    p = by[(16, 0.25, 2)]
    assert p.params == {"total_rate_per_ms": 4.0, "active_fraction": 0.25, "overcommit": 2}
    assert (p.overrides["workload.threads"], p.overrides["workload.rate_per_ms"], p.overrides["partition.lps"]) \
        == (4, 1.0, 2)
    assert "active_fraction" not in p.overrides  # a study parameter is no config key
    assert s.config(p).workload.threads == 4 and s.config(p).partition.lps == 2
    assert by[(8, 1.0, 1)].overrides["partition.lps"] == 8
    # an expression may read a base config value it does not vary: workload.group_size is 4 by default
    s = SweepSpec.from_dict({**DERIVED, "derive": {**DERIVED["derive"], "workload.pages": "workload.group_size * 2"}})
    assert {p.overrides["workload.pages"] for p in s.points} == {8}
    # ... but not a key derived later, which it would read at its base value
    later = {"workload.rate_per_ms": "total_rate_per_ms / workload.threads",
             "workload.threads": "max(1, round(partition.vps * active_fraction))",
             "partition.lps": "max(1, partition.vps // overcommit)"}
    with pytest.raises(ConfigError, match="uses workload.threads, which is derived later"):
        SweepSpec.from_dict({**DERIVED, "derive": later})


def test_a_derived_sweep_records_its_parameters_and_plots_read_them(tmp_path):
    s = SweepSpec.from_dict({**DERIVED, "grid": {"partition.vps": [8], "active_fraction": [0.5],
                                                 "overcommit": [2]}})
    out = run_sweep(s, tmp_path / "o", jobs=1, progress=False)
    row = out.points.iloc[0]
    assert (row["active_fraction"], row["overcommit"], row["workload.threads"], row["partition.lps"]) == (0.5, 2, 4, 2)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["points"][0]["params"]["active_fraction"] == 0.5
    from tlbsim.plots import load_sweep

    points, _, _ = load_sweep(tmp_path / "o")
    assert points["active_fraction"].tolist() == [0.5] and points["busy_vps_per_lp"].tolist() == [2.0]


@pytest.mark.parametrize("change,message", [
    ({"grid": {"partition.vps": [8], "activ_fraction": [0.5]}}, "activ_fraction.*none uses"),
    ({"derive": {"threads": "1"}}, "config key"),
    ({"derive": {"partition.vps": "8"}}, "given in"),
    ({"derive": {"workload.threads": "__import__('os').getpid()"}}, "calls only"),
    ({"derive": {"workload.threads": "partition.vps.bit_length"}}, "neither"),
    ({"derive": {"workload.threads": "'8'"}}, "numbers only"),
    ({"derive": {"workload.threads": "[8][0]"}}, "arithmetic only"),
    ({"derive": {"workload.threads": "8 +"}}, "cannot read"),
    ({"derive": {"workload.threads": 8}}, "expression in a string"),
    ({"derive": {"workload.threads": "partition.vps / 0"}}, "point 0.*division by zero"),
    ({"derive": {"workload.threads": "partition.vps * 0.3"}}, "must be an integer"),  # 2.4 threads
    ({"derive": {"workload.threads": "partition.vps * 4"}}, "threads"),  # more threads than VPs
    ({"derive": {"workload.threads": "workload.policy"}}, "not a number"),
])
def test_bad_derivations_fail_before_any_work(change, message):
    data = {**DERIVED, "grid": {"partition.vps": [8]}, "fixed": {}, "derive": {"workload.threads": "4"}}
    with pytest.raises(ConfigError, match=message):
        SweepSpec.from_dict({**data, **change})


def test_sweep_set_replaces_spec_entries_and_resume_needs_the_same(tmp_path, capsys):
    path = tmp_path / "d.toml"
    path.write_text(
        'name = "d"\nseed = 3\nbase = "' + DERIVED["base"] + '"\n[fixed]\n"partition.duration_us" = 1000.0\n'
        'total_rate_per_ms = 4.0\n[grid]\n"partition.vps" = [8, 16, 32]\nactive_fraction = [0.5]\n[derive]\n'
        '"workload.threads" = "round(partition.vps * active_fraction)"\n'
        '"workload.rate_per_ms" = "total_rate_per_ms / workload.threads"\n')
    s = SweepSpec.from_toml(path, sets=[("grid.partition.vps", [8]), ("fixed.total_rate_per_ms", 2.0),
                                        ("replications", 2)])
    assert len(s.points) == 1 and s.replications == 2 and s.points[0].overrides["workload.rate_per_ms"] == 0.5
    out = str(tmp_path / "o")
    args = ["sweep", str(path), "--out", out, "--no-progress", "--jobs", "1"]
    assert main([*args, "--set", "grid.partition.vps=[8]"]) == 0
    assert main([*args, "--set", "grid.partition.vps=[8]", "--resume"]) == 0
    assert "1 finished runs kept" in capsys.readouterr().out
    assert main([*args, "--resume"]) == 2  # the whole spec is another sweep: not mixed in
    assert "different sweep spec" in capsys.readouterr().err
    assert main([*args, "--set", "partition.vps=[8]"]) == 2
    assert "fixed.KEY, grid.KEY" in capsys.readouterr().err


def test_sweep_writes_tables_and_manifest(tmp_path):
    out = run_sweep(spec(), tmp_path / "s", jobs=2, progress=False)
    assert not out.failed and out.computed == 8
    tables = load_results(tmp_path / "s")
    assert set(tables) == {"points", "shootdowns"}
    pts = tables["points"]
    assert len(pts) == 8 and set(pts.status) == {"ok"}
    assert {"workload.policy", "latency_p50_us", "guest_work_fraction"} <= set(pts.columns)
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["root_seed"] == 7 and len(man["seeds"]) == 2 and man["events_processed"] > 0
    assert len(tables["shootdowns"]) == pts.shootdowns_completed.sum() + pts.shootdowns_incomplete.sum()
    assert not list((tmp_path / "s").rglob("*.tmp"))  # atomic writes leave no temporaries


def test_a_failing_point_is_recorded_and_the_rest_goes_on(tmp_path, monkeypatch, capsys):
    import tlbsim.runner as sim

    real = sim.simulate

    def flaky(config, seed=0):
        if config.workload.policy == "all" and config.workload.sharing == "groups":
            raise RuntimeError("injected failure")
        return real(config, seed)

    monkeypatch.setattr(sim, "simulate", flaky)
    out = run_sweep(spec(), tmp_path / "s", jobs=1, progress=False)
    assert sorted((p, r) for p, r, _ in out.failed) == [(3, 0), (3, 1)]
    pts = load_results(tmp_path / "s")["points"]
    assert (pts.status == "ok").sum() == 6 and "injected failure" in pts.error.iloc[-1]


def test_cli_sweep_exit_codes(tmp_path, capsys):
    spec_path = tmp_path / "s.toml"
    spec_path.write_text('name = "cli"\nreplications = 1\n[fixed]\n"partition.duration_us" = 5000.0\n'
                         '"partition.vps" = 4\n[grid]\n"workload.policy" = ["mask", "ipi"]\n')
    assert main(["sweep", str(spec_path), "--out", str(tmp_path / "o"), "--jobs", "1", "--no-progress"]) == 0
    # the same output directory without --resume: refused, nothing touched
    before = (tmp_path / "o" / "points.parquet").read_bytes()
    assert main(["sweep", str(spec_path), "--out", str(tmp_path / "o")]) == 2
    assert (tmp_path / "o" / "points.parquet").read_bytes() == before
    assert "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\n"partition.vps" = ["x"]\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "b")]) == 2


def test_resume_after_kill_recomputes_nothing_finished(tmp_path):
    """Kill a sweep mid-way (SIGKILL: no cleanup at all), then --resume."""
    spec_path = tmp_path / "s.toml"
    spec_path.write_text(
        f'name = "kill"\nbase = "{ROOT / "experiments/configs/default.toml"}"\nreplications = 12\nseed = 3\n'
        '[fixed]\n"partition.duration_us" = 30000.0\n"partition.vps" = 8\n')
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tlbsim.cli", "sweep", str(spec_path), "--out", str(out),
                             "--jobs", "1", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parts = out / "parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert 3 <= len(finished) < 12, "the kill should land mid-sweep"
    for f in parts.glob("*.json"):  # every part on disk is whole
        json.loads(f.read_text())
    res = run_sweep(SweepSpec.from_toml(spec_path), out, jobs=1, resume=True, progress=False)
    assert res.skipped == len(finished) and res.computed == 12 - len(finished)
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json") if p.name in finished} == finished
    # the resumed sweep equals one run straight through
    whole = run_sweep(SweepSpec.from_toml(spec_path), tmp_path / "whole", jobs=2, progress=False)
    cols = [c for c in whole.points.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(res.points[cols], whole.points[cols])


def test_local_processes_and_dask_give_identical_results(tmp_path):
    pytest.importorskip("dask.distributed")
    serial = run_sweep(spec(), tmp_path / "one", jobs=1, progress=False)
    local = run_sweep(spec(), tmp_path / "two", jobs=2, progress=False)
    dask = run_sweep(spec(), tmp_path / "dask", dask_local=2, progress=False)
    cols = [c for c in serial.points.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(serial.points[cols], local.points[cols])
    pd.testing.assert_frame_equal(serial.points[cols], dask.points[cols])
    a, b = load_results(tmp_path / "one")["shootdowns"], load_results(tmp_path / "dask")["shootdowns"]
    pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------------- interruption and worker death
def _tiny_spec(tmp_path, reps=2):
    text = (Path(__file__).resolve().parent.parent / "experiments" / "throughput.toml").read_text()
    base = (Path(__file__).resolve().parent.parent / "experiments" / "configs" / "default.toml").as_posix()
    text = text.replace('base = "configs/default.toml"', f'base = "{base}"')
    text = text.replace('"partition.duration_us" = 60000.0', '"partition.duration_us" = 3000.0')
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return SweepSpec.from_toml(path, replications=reps)


def test_a_worker_that_dies_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import os

    from tlbsim import sweep

    real = sweep.run_task

    def dies_on_point_1(spec, point, rep):
        if point == 1:
            os._exit(9)  # as the out-of-memory killer would end it
        return real(spec, point, rep)

    monkeypatch.setattr(sweep, "run_task", dies_on_point_1)  # inherited by the forked workers
    spec = _tiny_spec(tmp_path)
    out = run_sweep(spec, tmp_path / "s", jobs=2, progress=False)
    failed = {(p, r) for p, r, _ in out.failed}
    assert failed == {(1, 0), (1, 1)}
    assert all("worker process" in e for _, _, e in out.failed)
    assert len(out.points) == len(spec.points) * 2
    monkeypatch.setattr(sweep, "run_task", real)
    again = run_sweep(spec, tmp_path / "s", jobs=2, resume=True, retry_failed=True, progress=False)
    assert not again.failed and again.computed == 2


def test_sigint_stops_a_parallel_sweep_at_once_and_resume_finishes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    spec_path = tmp_path / "tiny.toml"
    _tiny_spec(tmp_path)  # writes tiny.toml
    cmd = [sys.executable, "-m", "tlbsim", "sweep", str(spec_path), "--out", str(tmp_path / "s"), "--jobs", "2",
           "--replications", "40", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130, err
    assert err.strip().count("\n") == 0 and "--resume" in err and "Traceback" not in err
    kept = len(list((tmp_path / "s" / "parts").glob("*.json")))
    assert 0 < kept < len(SweepSpec.from_toml(spec_path, replications=40).tasks())
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"{kept} resumed" in done.stdout


def test_resume_removes_half_written_files(tmp_path):
    spec = _tiny_spec(tmp_path, reps=1)
    out = tmp_path / "s"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / ".p0001-r0000.json.x.tmp").write_text("half")
    run_sweep(spec, out, jobs=1, resume=True, progress=False)
    assert not list((out / "parts").glob(".*.tmp"))


def test_dask_local_needs_workers(tmp_path, capsys):
    from tlbsim.cli import main

    spec = _tiny_spec(tmp_path, reps=1)
    assert spec.points
    for n in ("0", "-1"):
        assert main(["sweep", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "o"), "--dask-local", n]) == 2
        assert "--dask-local" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ('name = "../../x"\n', "sweep name"), ('name = "/abs"\n', "sweep name"), ("fixed = 5\n", "[fixed] must be a table"),
    ('grid = "abc"\n', "[grid] must be a table"), ("base = 5\n", "base"),
])
def test_malformed_specs_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_load_results_refuses_tables_outside_the_directory(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"kind": "tlbsim-run", "tables": {"x": "../../etc/passwd"}}))
    with pytest.raises(ValueError, match="outside"):
        load_results(d)
