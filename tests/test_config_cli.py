"""Configuration at the edge, and the command line's contract: one clear
line and exit 2 on bad input, results + manifest on success."""

import json
import math
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from tlbsim import Config, ConfigError, Result, simulate
from tlbsim.cli import main
from tlbsim.config import parse_override

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "experiments" / "configs" / "default.toml"


def test_default_toml_documents_every_key_with_the_code_defaults():
    data = tomllib.loads(DEFAULT.read_text())
    assert Config.from_dict(data) == Config()
    code = Config().to_dict()
    for section, keys in code.items():
        assert set(data[section]) == set(keys), section


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"partition.vps": "many"}, "partition.vps"),
        ({"partition.vpus": 3}, "partition.vpus"),
        ({"costs.invlpg_us": -0.1}, "costs.invlpg_us"),
        ({"partition.duration_us": math.inf}, "partition.duration_us"),
        ({"workload.policy": "magic"}, "workload.policy"),
        ({"workload.processor_mask": 0x10000}, "workload.processor_mask"),
        ({"workload.initiators": [99]}, "workload.initiators"),
        ({"exits.memory_access.cost_us": -1}, "exits.memory_access.cost_us"),
        ({"exits.memory_access": 3}, "exits.memory_access"),
        ({"run.check_invariants": "yes"}, "run.check_invariants"),
    ],
)
def test_invalid_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        Config().with_overrides(overrides)
    assert err.value.key == key and str(err.value).startswith(key)


def test_overrides_parse_as_toml_values():
    assert parse_override("partition.vps=32") == ("partition.vps", 32)
    assert parse_override("workload.policy=linux") == ("workload.policy", "linux")
    assert parse_override("locks.vsm_vps=[1, 2]") == ("locks.vsm_vps", [1, 2])
    assert parse_override("workload.processor_mask=0x51") == ("workload.processor_mask", 0x51)
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_run_writes_tables_and_manifest(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["run", str(DEFAULT), "--seed", "4", "--set", "partition.duration_us=20000", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "latency p99 (us)" in text and "useful guest work, share of VP time" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 4 and manifest["config"]["partition"]["duration_us"] == 20000
    assert manifest["tlbsim_version"] and manifest["git_revision"]
    loaded = Result.load(out)
    again = simulate(Config.from_toml(DEFAULT, {"partition.duration_us": 20000}), seed=4)
    pd.testing.assert_frame_equal(loaded.shootdowns, again.shootdowns, check_dtype=False)
    assert set(loaded.shootdowns.columns) >= {
        "initiator_vp", "policy", "call_code", "flags", "n_targets", "issue_us", "complete_us", "latency_us",
        "suspensions", "reissues", "status"}
    assert set(loaded.exits.columns) == {"partition", "vp", "reason", "code", "count", "time_us"}
    pd.testing.assert_frame_equal(loaded.partitions, again.partitions, check_dtype=False)
    assert list(loaded.partitions.partition) == [0] and loaded.partitions.loc[0, "policy"] == "mask"


def test_run_replications_saves_each_replication_and_the_index(tmp_path, capsys):
    """--replications N --out: one result directory per replication (the seed is the replication's own:
    the same tables a single run with that seed gives) and an index of the N summaries."""
    from tlbsim.model.rng import replication_seed

    out = tmp_path / "reps"
    rc = main(["run", str(DEFAULT), "--seed", "9", "--replications", "3", "--set", "partition.duration_us=5000",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "3 replications" in printed and "95 % interval" in printed and "intervals (95 %):" in printed
    index = json.loads((out / "manifest.json").read_text())
    assert index["kind"] == "tlbsim-run-replications" and index["runs"] == [f"replication-{r}" for r in range(3)]
    table = pd.read_parquet(out / "replications.parquet")
    assert list(table["replication"]) == [0, 1, 2]
    for r in range(3):
        saved = Result.load(out / f"replication-{r}")
        again = simulate(Config.from_toml(DEFAULT, {"partition.duration_us": 5000}), seed=replication_seed(9, r))
        pd.testing.assert_frame_equal(saved.shootdowns, again.shootdowns, check_dtype=False)
        assert table.loc[r, "latency_p99_us"] == again.summary["latency_p99_us"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "missing.toml"], "does not exist"),
        (["run", str(DEFAULT), "--set", "partition.vps=abc"], "partition.vps"),
        (["run", str(DEFAULT), "--set", "partition.vps=4", "--set", "workload.processor_mask=0x30"],
         "workload.processor_mask"),
        (["run", str(DEFAULT), "--set", "costs.refill_us=-1"], "costs.refill_us"),
        (["run", str(DEFAULT), "--set", "nonsense"], "KEY=VALUE"),
        (["run", str(DEFAULT), "--seed", "x"], "a seed is an integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    with pytest.raises(SystemExit) if "--seed" in args else _no_raise():
        rc = main(args)
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_toml_and_out_path(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[partition\nvps = 3")
    assert main(["run", str(bad)]) == 2
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["run", str(DEFAULT), "--out", str(f)]) == 2
    assert f.read_text() == "keep me"
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("rate", [3.0, 0.0])
def test_spilled_run_gives_the_same_table_and_summary(tmp_path, rate):
    """simulate(spill_dir=...) writes the shootdown table as the run goes, keeping in memory only the
    columns a late deferred flush can still change: the saved table and the summary are those of the
    run held in memory. Overcommitted, so deferred flushes land after their rows were spilled (tiny
    row groups); and a run with no shootdown at all."""
    cfg = Config.from_toml(DEFAULT, {"partition.duration_us": 60000, "partition.vps": 8, "partition.lps": 4,
                                     "workload.rate_per_ms": rate})
    held = simulate(cfg, seed=5)
    spilled = simulate(cfg, seed=5, spill_dir=tmp_path, spill_rows=64)
    if rate:
        assert held.shootdowns["deferred_targets"].sum() > 0 and len(held.shootdowns) > 10 * 64
    pd.testing.assert_series_equal(held.summary, spilled.summary)
    spilled.save(tmp_path / "spilled")  # another directory: the table is copied there
    spilled.save(tmp_path)  # its own: moved into place
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    held.save(tmp_path / "held")
    for directory in (tmp_path, tmp_path / "spilled"):
        pd.testing.assert_frame_equal(Result.load(directory).shootdowns, Result.load(tmp_path / "held").shootdowns)
    if rate:
        pd.testing.assert_frame_equal(Result.load(tmp_path).shootdowns, held.shootdowns)


def test_a_failed_spilled_run_leaves_no_partial_files(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["run", str(DEFAULT), "--no-progress", "--set", "run.max_events=5000", "--out", str(out)])
    assert rc == 2 and "run.max_events" in capsys.readouterr().err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize(("overrides", "key", "words"), [
    ({"host.guests": 3, "host.guest_policies": ["ipi"]}, "host.guest_policies", "1 policies for 2 other"),
    ({"host.guests": 2, "host.guest_policies": ["nope"]}, "host.guest_policies[0]", "must be one of"),
    ({"host.guests": 0}, "host.guests", ""),
    ({"host.guests": 65}, "host.guests", "at most 64"),
    ({"workload.threads": 17}, "workload.threads", "17 threads, but the partition has 16 VPs"),
    ({"host.scheduler": "bfs"}, "host.scheduler", "must be one of"),
    ({"host.runqueues": "global"}, "host.runqueues", "must be one of"),
    ({"partition.semantics": "kvm", "partition.slice_us": 3000.0}, "partition.slice_us", "no effect under the eevdf"),
    ({"host.sched_latency_us": 5.0}, "host.sched_latency_us", "10 us to 1 s"),
    ({"guest.kernel_fraction": 1.5}, "guest.kernel_fraction", ""),
    ({"spin.candidates": "all"}, "spin.candidates", "must be one of"),
])
def test_host_and_guest_load_keys_are_checked(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        Config().with_overrides(overrides)
    assert err.value.key == key and words in str(err.value)


@pytest.mark.parametrize(("overrides", "key", "words"), [
    ({"workload.sleep_us": 50.0}, "workload.sleep_us", "closed loop only"),
    ({"host.sched_base_slice_us": 3000.0}, "host.sched_base_slice_us", "no effect under the hyperv"),
    ({"partition.semantics": "kvm", "host.sched_latency_us": 6000.0}, "host.sched_latency_us",
     "it uses host.sched_base_slice_us"),
    ({"workload.threads": 4, "workload.initiators": [5]}, "workload.initiators", "VP 5 has no thread"),
    ({"host.guests": 64, "partition.vps": 2048}, "host.guests", "at most 65,536 guest VPs"),
])
def test_keys_that_would_do_nothing_are_refused(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        Config().with_overrides(overrides)
    assert err.value.key == key and words in str(err.value)
