"""Issue 24: resumes that would mix configurations, signals and worker processes, output paths checked
before the run, inputs that are not regular files. Every refusal is one line, exit 2, and leaves what
was already written as it was."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tlbsim.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "experiments" / "configs" / "default.toml"
LINUX = sys.platform.startswith("linux") and Path("/proc/self/stat").exists()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) with a hash of its contents."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


def tiny_sweep(tmp_path: Path, reps: int = 2, duration: float = 3000.0, name: str = "tiny") -> Path:
    """A spec with its own copy of the base config (so that a test can edit it)."""
    base = tmp_path / "base.toml"
    if not base.exists():
        base.write_text(DEFAULT.read_text())
    spec = tmp_path / f"{name}.toml"
    spec.write_text(f'name = "{name}"\nbase = "base.toml"\nreplications = {reps}\nseed = 5\n[fixed]\n'
                    f'"partition.duration_us" = {duration}\n"partition.vps" = 4\n'
                    '[grid]\n"workload.policy" = ["mask", "ipi"]\n')
    return spec


# ---------------------------------------------------------------- 24.1: resume compares resolved configurations
def test_resume_refuses_runs_made_with_another_base_config(tmp_path, capsys):
    spec = tiny_sweep(tmp_path)
    out = tmp_path / "o"
    assert main(["sweep", str(spec), "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    assert {len(h) for h in pd.read_parquet(out / "points.parquet")["config_hash"]} == {16}
    capsys.readouterr()
    base = tmp_path / "base.toml"
    base.write_text(base.read_text().replace("hypercall_decode_us = 0.1 ", "hypercall_decode_us = 0.3 "))
    before = snapshot(out)
    assert main(["sweep", str(spec), "--out", str(out), "--resume", "--no-progress"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "costs.hypercall_decode_us" in line and "0.1" in line and "0.3" in line and "--force" in line
    assert "tlbsim sweep" not in captured.out  # refused before the plan is printed
    assert snapshot(out) == before
    # --force computes it again with the new value; a resume then keeps every run
    assert main(["sweep", str(spec), "--out", str(out), "--force", "--jobs", "1", "--no-progress"]) == 0
    assert main(["sweep", str(spec), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "0 runs computed, 4 resumed" in capsys.readouterr().out


def test_resume_refuses_a_trace_whose_contents_changed(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("time_us,vp,address_space,pages\n100,0,0,1\n200,1,0,1\n")
    spec = tiny_sweep(tmp_path, reps=1)
    spec.write_text(spec.read_text().replace("[fixed]\n", f'[fixed]\n"workload.trace" = "{trace.as_posix()}"\n'))
    out = tmp_path / "o"
    assert main(["sweep", str(spec), "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    trace.write_text("time_us,vp,address_space,pages\n100,0,0,1\n300,1,0,1\n")
    before = snapshot(out)
    assert main(["sweep", str(spec), "--out", str(out), "--resume", "--no-progress"]) == 2
    assert f"the contents of {trace.as_posix()} changed" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_force_recomputes_and_removes_only_the_sweeps_own_files(tmp_path, capsys):
    out = tmp_path / "o"
    big = tiny_sweep(tmp_path, reps=3, name="big")
    assert main(["sweep", str(big), "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "parts" / "README").write_text("mine too")
    small = tiny_sweep(tmp_path, reps=1, name="small")
    assert main(["sweep", str(small), "--out", str(out), "--no-progress"]) == 2  # another sweep: refused
    assert main(["sweep", str(small), "--out", str(out), "--force", "--resume"]) == 2  # contradictory
    capsys.readouterr()
    assert main(["sweep", str(small), "--out", str(out), "--force", "--jobs", "1", "--no-progress"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "parts" / "README").read_text() == "mine too"
    points = pd.read_parquet(out / "points.parquet")
    assert sorted(zip(points["point"], points["replication"], strict=True)) == [(0, 0), (1, 0)]
    assert sorted(p.name for p in (out / "parts").glob("*.json")) == ["p00000_r000.json", "p00001_r000.json"]


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--force"]])
def test_sweep_refuses_a_single_runs_directory(tmp_path, capsys, flags):
    run_dir = tmp_path / "run"
    assert main(["run", str(DEFAULT), "--set", "partition.duration_us=2000", "--out", str(run_dir),
                 "--no-progress"]) == 0
    capsys.readouterr()
    before = snapshot(run_dir)
    assert main(["sweep", str(tiny_sweep(tmp_path)), "--out", str(run_dir), "--no-progress", *flags]) == 2
    captured = capsys.readouterr()
    assert "single run's results" in one_error_line(captured.err) and "tlbsim run --out" in captured.err
    assert "tlbsim sweep" not in captured.out
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- 24.2: signals and worker processes
def _children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_parallel_sweep(tmp_path: Path, started: list[int]):
    spec = tiny_sweep(tmp_path, reps=60, duration=20000.0)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "tlbsim", "sweep", str(spec), "--out", str(out), "--jobs", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    started.append(proc.pid)
    deadline = time.monotonic() + 20
    workers: list[int] = []
    while time.monotonic() < deadline and (len(workers) < 2 or not list((out / "parts").glob("*.json"))):
        time.sleep(0.1)
        workers = _children(proc.pid)
    started += workers
    assert len(workers) == 2, "the sweep should have started its two workers"
    return proc, workers, out


@pytest.fixture
def started():
    """The processes a test starts, killed at the end if still alive (a failing test leaves none)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not LINUX, reason="finds processes through /proc")
def test_sigterm_stops_a_parallel_sweep_like_ctrl_c(tmp_path, started):
    proc, workers, out = _start_parallel_sweep(tmp_path, started)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    # at once: a worker that inherited the CLI's SIGTERM handler went on with its queued runs (seconds)
    assert time.monotonic() - signalled < 3.0
    assert proc.returncode == 143, err
    line = one_error_line(err)
    assert "SIGTERM" in line and "--resume" in line and str(out) in line
    kept = list((out / "parts").glob("*.json"))
    assert 0 < len(kept) < 120
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]
    assert len(list((out / "parts").glob("*.json"))) == len(kept)  # nothing written after the stop


@pytest.mark.skipif(not LINUX, reason="finds processes through /proc")
def test_workers_die_with_a_parent_killed_by_sigkill(tmp_path, started):
    proc, workers, _ = _start_parallel_sweep(tmp_path, started)
    proc.kill()  # SIGKILL: the parent cleans up nothing
    # a caller reading to end-of-output is not kept waiting by workers holding the pipes
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "a worker outlived its parent"


# ---------------------------------------------------------------- 24.4: output paths checked before any work
def _blocked_outs(tmp_path: Path) -> list[Path]:
    """Output directories that cannot be made: one under a regular file, one in a read-only directory
    (not for root, whom permissions do not stop)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    outs = [a_file / "out"]
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        outs.append(ro / "out")
    return outs


def test_sweep_validate_and_sensitivity_refuse_an_out_they_cannot_write(tmp_path, capsys):
    spec = tiny_sweep(tmp_path)
    study = ROOT / "experiments" / "sensitivity" / "policy_choice.toml"
    for out in _blocked_outs(tmp_path):
        for args in (["sweep", str(spec)], ["validate", "--quick"], ["sensitivity", str(study)]):
            assert main([*args, "--out", str(out), "--no-progress"]) == 2, (args, out)
            captured = capsys.readouterr()
            assert str(out) in one_error_line(captured.err), args
            assert "runs ->" not in captured.out and "case(s)" not in captured.out  # before any plan or run


def test_a_300_character_sweep_name_or_out_is_one_line(tmp_path, capsys):
    spec = tiny_sweep(tmp_path)
    spec.write_text(spec.read_text().replace('name = "tiny"', f'name = "{"n" * 300}"'))
    assert main(["sweep", str(spec), "--no-progress"]) == 2
    assert "at most 100 characters" in one_error_line(capsys.readouterr().err)
    for args in (["sweep", str(tiny_sweep(tmp_path))], ["run", str(DEFAULT)], ["validate", "--quick"]):
        assert main([*args, "--out", str(tmp_path / ("o" * 300)), "--no-progress"]) == 2
        assert "too long" in one_error_line(capsys.readouterr().err)


@pytest.fixture
def no_simulation(monkeypatch):
    """Any simulation fails the test: a refusal must come before the run."""
    import tlbsim.runner

    def refuse(*args, **kwargs):
        raise AssertionError("the simulation ran before the refusal")

    monkeypatch.setattr(tlbsim.runner, "simulate", refuse)


def _bad_outputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "adir").mkdir()
    cases = [(["--trace", str(tmp_path / "adir")], "is a directory"),
             (["--timeline", str(tmp_path / "adir")], "is a directory"),
             (["--timeline", str(tmp_path / "t.xyz")], "not a figure format"),
             (["--trace", str(tmp_path / "a-file" / "t.json")], "a-file is a file, not a directory")]
    (tmp_path / "a-file").write_text("x")
    if os.geteuid() != 0:
        locked = tmp_path / "locked.json"
        locked.write_text("{}")
        locked.chmod(0o444)
        cases.append((["--trace", str(locked)], "permission denied"))
    return cases


def test_run_checks_trace_and_timeline_before_the_simulation(tmp_path, capsys, no_simulation):
    out = tmp_path / "o"
    for flags, words in _bad_outputs(tmp_path):
        assert main(["run", str(DEFAULT), "--out", str(out), "--no-progress", *flags]) == 2, flags
        assert words in one_error_line(capsys.readouterr().err), flags
        assert not any(out.iterdir()), "nothing is written, no temporary file is left"


def test_run_refuses_a_window_after_the_end_of_the_run(tmp_path, capsys, no_simulation):
    assert main(["run", str(DEFAULT), "--set", "partition.duration_us=2000", "--window", "3000:4000",
                 "--trace", str(tmp_path / "t.json"), "--no-progress"]) == 2
    assert "after the run ends" in one_error_line(capsys.readouterr().err)


def test_a_failed_save_leaves_no_temporary_file_and_a_later_run_removes_stale_ones(tmp_path, capsys, monkeypatch):
    from tlbsim.results import Result

    out = tmp_path / "o"
    out.mkdir()
    stale = [out / ".shootdowns.parquet.k1l2.tmp", out / ".shootdowns.partial.x.tmp", out / ".vps.parquet.y.tmp"]
    for f in stale:
        f.write_text("left by a killed run")
    (out / "notes.tmp").write_text("not tlbsim's")
    args = ["run", str(DEFAULT), "--set", "partition.duration_us=3000", "--out", str(out), "--no-progress"]

    def disk_full(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Result, "save", disk_full)
    assert main(args) == 2
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.tmp"]  # the stale files went, the spill too
    monkeypatch.undo()
    for f in stale:
        f.write_text("left by a killed run")
    assert main(args) == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and p.name != "notes.tmp"]
    assert (out / "shootdowns.parquet").exists() and (out / "notes.tmp").exists()


def test_a_timeline_that_cannot_be_written_after_the_run_does_not_cost_the_results(tmp_path, capsys, monkeypatch):
    import tlbsim.timeline_output

    def fails(timeline, path, vps, title=""):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tlbsim.timeline_output, "draw_timeline", fails)
    out = tmp_path / "o"
    assert main(["run", str(DEFAULT), "--set", "partition.duration_us=3000", "--out", str(out),
                 "--timeline", str(tmp_path / "t.png"), "--no-progress"]) == 2
    assert "No space left" in one_error_line(capsys.readouterr().err)
    assert (out / "manifest.json").exists() and (out / "shootdowns.parquet").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- 24.6: inputs that are not regular files
def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """In a subprocess with a timeout: a FIFO that blocked would hang the test, not fail it."""
    return subprocess.run([sys.executable, "-m", "tlbsim", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX special files")
def test_inputs_that_are_not_regular_files_are_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # a device read to the end, a FIFO waited on: in a subprocess, so that the old behaviour fails the test
    for args, words in ((["run", "/dev/zero"], "character device"),
                        (["run", str(DEFAULT), "--set", 'workload.trace="/dev/zero"'], "character device"),
                        (["run", str(fifo)], "FIFO"),
                        (["run", str(DEFAULT), "--set", f'workload.trace="{fifo}"'], "FIFO"),
                        (["run", str(DEFAULT), "--set", "vf.count=1", "--set", f'vf.trace="{fifo}"'], "FIFO"),
                        (["sweep", str(fifo)], "FIFO"),
                        (["bench", "--quick", "--compare", str(fifo)], "FIFO")):
        done = _run_cli(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert words in one_error_line(done.stderr), args
    adir = tmp_path / "adir"
    adir.mkdir()
    for args in (["run", str(adir)], ["run", str(DEFAULT), "--set", f'workload.trace="{adir}"'], ["sweep", str(adir)]):
        assert main([*args, "--no-progress"]) == 2
        assert "is a directory" in one_error_line(capsys.readouterr().err), args


# ---------------------------------------------------------------- 24.5 (config side): costs a hypervisor could have
def test_every_cost_key_is_bounded_and_the_bounds_are_documented():
    import dataclasses
    import re

    from tlbsim import Config, ConfigError
    from tlbsim.config import COST_LIMITS_US, CostConfig

    keys = [f.name for f in dataclasses.fields(CostConfig) if f.name.endswith("_us")]
    assert sorted(keys) == sorted(COST_LIMITS_US), "a [costs] time without a bound"
    table = (ROOT / "docs" / "calibration.md").read_text().split("**Accepted values.**", 1)[1].split("## ", 1)[0]
    for key, limit in COST_LIMITS_US.items():
        assert 0 <= getattr(CostConfig(), key) <= limit
        Config().with_overrides({f"costs.{key}": limit})  # the bound itself is accepted
        with pytest.raises(ConfigError, match=re.escape(f"costs.{key}: must be in 0-{limit:,g} us")):
            Config().with_overrides({f"costs.{key}": limit * 1.001})
        row = next(line for line in table.splitlines() if line.startswith("|") and re.search(rf"\b{key}\b", line))
        assert f"0-{limit:,g} us" in row, key


@pytest.mark.parametrize("setting", ["costs.vmexit_roundtrip_us=1e300", "costs.hypercall_decode_us=20000",
                                     "costs.refill_us=11", "costs.continuation_limit_us=1e5"])
def test_costs_no_hypervisor_could_have_are_one_line_and_exit_2(capsys, setting, no_simulation):
    assert main(["run", str(DEFAULT), "--set", setting, "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert setting.split("=")[0] in line and "us" in line


# ---------------------------------------------------------------- 24.7: trace errors name the file's line
def test_trace_errors_name_the_line_of_the_file_blank_lines_counted(tmp_path, capsys):
    rows = ["time_us,vp,address_space,pages", "10,0,0,1", "", "", "20,1,0,1", "",
            *[f"{30 + i},0,0,1" for i in range(8)]]
    rows.append("nan,1,0,1")  # line 15
    assert len(rows) == 15
    trace = tmp_path / "t.csv"
    trace.write_text("\n".join(rows) + "\n")
    assert main(["run", str(DEFAULT), "--set", f'workload.trace="{trace}"', "--no-progress"]) == 2
    assert f"{trace}:15:" in one_error_line(capsys.readouterr().err)
    vf = tmp_path / "vf.csv"
    vf.write_text("time_us,vf,block_mask\n10,0,1\n\n\n\nnan,0,1\n")
    assert main(["run", str(DEFAULT), "--set", "vf.count=1", "--set", f'vf.trace="{vf}"', "--no-progress"]) == 2
    assert f"{vf}:6:" in one_error_line(capsys.readouterr().err)
    trace.write_text("time_us,vp,address_space,pages\n10,0,0,1\n\n20,1,1,1\n")  # address space 1 under sharing all
    assert main(["run", str(DEFAULT), "--set", f'workload.trace="{trace}"', "--no-progress"]) == 2
    assert f"{trace}:4:" in one_error_line(capsys.readouterr().err)


def test_trace_numbers_are_ascii_digits(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("time_us,vp,address_space,pages\n10,0,0,1\n\u0663,1,0,1\n")  # an Arabic-Indic 3
    assert main(["run", str(DEFAULT), "--set", f'workload.trace="{trace}"', "--no-progress"]) == 2
    assert f"{trace}:3: time_us is not a number in ASCII digits" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- 24.8: the Python API
def test_simulate_records_a_drawn_seed_and_refuses_what_is_not_one():
    import numpy as np

    from tlbsim import Config
    from tlbsim.runner import simulate

    config = Config().with_overrides({"partition.duration_us": 2000.0, "partition.vps": 4})
    drawn = simulate(config, seed=None)
    assert isinstance(drawn.seed, int) and drawn.manifest()["seed"] == drawn.seed
    again = simulate(config, seed=drawn.seed)  # the recorded seed repeats the run
    pd.testing.assert_frame_equal(drawn.shootdowns, again.shootdowns)
    assert simulate(config, seed=np.int64(3)).seed == 3
    for bad, error in ((True, TypeError), (1.5, TypeError), ("7", TypeError), (-1, ValueError)):
        with pytest.raises(error, match="seed"):
            simulate(config, seed=bad)


def test_with_overrides_takes_numpy_values_and_paths(tmp_path):
    import numpy as np

    from tlbsim import Config

    trace = tmp_path / "t.csv"
    config = Config().with_overrides({"partition.vps": np.int64(8), "run.check_invariants": np.bool_(True),
                                      "costs.refill_us": np.float64(0.05), "workload.trace": trace,
                                      "workload.initiators": np.array([1, 2])})
    assert (config.partition.vps, config.run.check_invariants, config.workload.trace) == (8, True, str(trace))
    assert type(config.partition.vps) is int and config.workload.initiators == [1, 2]


def test_sections_built_directly_are_checked_at_construction():
    from tlbsim import Config, ConfigError
    from tlbsim.config import CostConfig, PartitionConfig
    from tlbsim.runner import simulate

    with pytest.raises(ConfigError, match=r"partition\.vps: must be an integer, got 16\.5"):
        PartitionConfig(vps=16.5)
    with pytest.raises(ConfigError, match=r"costs\.hypercall_decode_us: must be in 0-1,000 us"):
        CostConfig(hypercall_decode_us=20000.0)
    with pytest.raises(ConfigError, match="partition: must be a PartitionConfig"):
        Config(partition={"vps": 8})
    part = PartitionConfig(vps=4, duration_us=2000)  # an int where a float goes is a float, as from TOML
    assert type(part.duration_us) is float
    assert simulate(Config(partition=part), seed=1).summary["shootdowns_completed"] >= 0


# ---------------------------------------------------------------- 24.9: small ones
def test_seed_with_leading_zeros_and_timeline_named_as_written(tmp_path, capsys):
    from tlbsim.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["run", "x", "--seed", "010"]).seed == 10 and parse(["run", "x", "--seed", "0x10"]).seed == 16
    with pytest.raises(SystemExit):
        parse(["run", "x", "--seed", "\u0663"])
    capsys.readouterr()
    figure = tmp_path / "tl"
    assert main(["run", str(DEFAULT), "--set", "partition.duration_us=2000", "--set", "partition.vps=4",
                 "--timeline", str(figure), "--no-progress"]) == 0
    assert f"timeline figure written to {figure}.png" in capsys.readouterr().out
    assert (tmp_path / "tl.png").exists() and not figure.exists()
