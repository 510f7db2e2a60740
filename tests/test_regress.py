"""The CI regression gate (tlbsim check): both tiers, bad baselines, --update.

Scenarios here are small copies of the committed ones (short runs, 8
replications) written into a temporary baseline directory, so the tests
never touch results/baselines/.
"""

import json
from pathlib import Path

import pytest

from tlbsim import regress
from tlbsim.cli import main

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "configs" / "default.toml"

SCENARIOS = f"""
[scenario.small_mask]
description = "16 VPs on 16 LPs, ProcessorMask"
config = "{DEFAULT.as_posix()}"
seed = 7
replications = 8
set = {{ "partition.duration_us" = 15000.0, "workload.policy" = "mask" }}
thresholds = {{ latency_p99_us = 0.10, suspensions_per_shootdown = 0.50 }}

[scenario.small_pv]
description = "16 VPs on 8 LPs, KVM PV flush"
config = "{DEFAULT.as_posix()}"
seed = 8
replications = 8
set = {{ "partition.duration_us" = 15000.0, "partition.lps" = 8, "workload.policy" = "kvm-pv" }}
thresholds = {{ latency_mean_us = 0.30, latency_p99_us = 0.30, suspensions_per_shootdown = 0.50 }}
"""


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("baselines")
    (d / "scenarios.toml").write_text(SCENARIOS)
    assert main(["check", "--baseline", str(d), "--update"]) == 0
    return d


def run_json(capsys, *args) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(["check", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_unchanged_model_passes_both_tiers(baseline_dir, capsys):
    rc, out = run_json(capsys, "--baseline", str(baseline_dir))
    assert rc == 0 and out["ok"]
    tiers = {r["tier"] for r in out["rows"]}
    assert tiers == {"exact", "statistical"}
    # 2 scenarios x metrics x 2 tiers, every one identical to the baseline
    assert len(out["rows"]) == 2 * len(regress.METRICS) * 2
    assert all(r["change_pct"] == 0 for r in out["rows"])


def test_a_20_percent_cost_change_is_flagged_by_both_tiers_naming_latency(baseline_dir, capsys):
    # hv_ipi_roundtrip_us 0.5 -> 1.0: every mask shootdown with a running target waits 0.5 us
    # longer for its slowest acknowledgement: about +0.5 us on ~3.6 us.
    rc, out = run_json(capsys, "--baseline", str(baseline_dir), "--scenario", "small_mask",
                       "--set", "costs.hv_ipi_roundtrip_us=1.0")
    assert rc == 1 and not out["ok"]
    changed = {(r["tier"], r["metric"]) for r in out["rows"] if r["verdict"] == "CHANGED"}
    for tier in ("exact", "statistical"):
        assert (tier, "latency_mean_us") in changed
        assert (tier, "latency_p50_us") in changed
    # the shootdown count does not move by more than its threshold: not named
    assert ("statistical", "shootdowns_completed") not in changed
    stat = next(r for r in out["rows"] if r["tier"] == "statistical" and r["metric"] == "latency_mean_us")
    assert 10 < stat["change_pct"] < 25 and stat["lo"] > 0


def test_human_table_names_the_regression(baseline_dir, capsys):
    rc = main(["check", "--baseline", str(baseline_dir), "--scenario", "small_mask", "--tier", "statistical",
               "--set", "costs.hv_ipi_roundtrip_us=1.0"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "REGRESSION" in text and "small_mask/latency_mean_us (statistical)" in text


@pytest.mark.parametrize("seed", [101, 202])
def test_other_seeds_same_model_pass_the_statistical_tier(baseline_dir, capsys, seed):
    rc, out = run_json(capsys, "--baseline", str(baseline_dir), "--tier", "statistical", "--seed", str(seed))
    assert rc == 0, [r for r in out["rows"] if r["verdict"] == "CHANGED"]
    # the comparison really was unpaired and saw different numbers
    assert all(r["tier"] == "statistical (unpaired)" for r in out["rows"])
    assert any(r["change_pct"] != 0 for r in out["rows"])


def test_exact_tier_catches_a_tiny_behaviour_change(baseline_dir, capsys):
    # +1 % on the VM exit round trip: far below every practical threshold,
    # but the exact tier must see it.
    rc, out = run_json(capsys, "--baseline", str(baseline_dir), "--scenario", "small_mask", "--tier", "exact",
                       "--set", "costs.vmexit_roundtrip_us=0.606")
    assert rc == 1
    assert any(r["metric"] == "latency_mean_us" and r["verdict"] == "CHANGED" for r in out["rows"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_field", "delete"])
def test_corrupt_or_missing_baseline_is_exit_2_and_left_as_it_was(baseline_dir, tmp_path, capsys, damage):
    d = tmp_path / "b"
    d.mkdir()
    for f in baseline_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    target = d / "small_pv.json"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:200])
    elif damage == "garbage":
        target.write_bytes(b"\x00\xffnot json")
    elif damage == "missing_field":
        data = json.loads(target.read_text())
        del data["statistical"]["metrics"]["latency_p99_us"]
        target.write_text(json.dumps(data))
    else:
        target.unlink()
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    capsys.readouterr()
    rc = main(["check", "--baseline", str(d)])
    cap = capsys.readouterr()
    assert rc == 2
    message = cap.err.strip()
    assert "small_pv" in message and "\n" not in message and "Traceback" not in cap.err
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before


def test_bad_scenario_file_is_exit_2(tmp_path, capsys):
    assert main(["check", "--baseline", str(tmp_path)]) == 2  # no scenarios.toml
    (tmp_path / "scenarios.toml").write_text("[scenario.x\n")
    assert main(["check", "--baseline", str(tmp_path)]) == 2
    (tmp_path / "scenarios.toml").write_text('[scenario.x]\nset = { "partition.vps" = -1 }\n')
    assert main(["check", "--baseline", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "partition.vps" in err and "Traceback" not in err


def test_update_round_trips(baseline_dir, tmp_path, capsys):
    d = tmp_path / "b"
    d.mkdir()
    (d / "scenarios.toml").write_text((baseline_dir / "scenarios.toml").read_text())
    # first --update creates, second reports nothing changed and writes the same numbers
    assert main(["check", "--baseline", str(d), "--update"]) == 0
    first = {n: json.loads((d / f"{n}.json").read_text()) for n in ("small_mask", "small_pv")}
    capsys.readouterr()
    assert main(["check", "--baseline", str(d), "--update"]) == 0
    assert capsys.readouterr().out.count("nothing changed") == 2
    second = {n: json.loads((d / f"{n}.json").read_text()) for n in ("small_mask", "small_pv")}
    for n in first:
        assert first[n]["exact"] == second[n]["exact"]
        assert first[n]["statistical"] == second[n]["statistical"]
    assert main(["check", "--baseline", str(d)]) == 0
    # an update with a changed model prints what moved, then the new baseline holds
    capsys.readouterr()
    assert main(["check", "--baseline", str(d), "--update", "--scenario", "small_mask",
                 "--set", "costs.hv_ipi_roundtrip_us=1.0"]) == 0
    out = capsys.readouterr().out
    assert "small_mask: baseline rewritten; what changed" in out and "latency_mean_us" in out
    assert main(["check", "--baseline", str(d), "--scenario", "small_mask",
                 "--set", "costs.hv_ipi_roundtrip_us=1.0"]) == 0
    # that baseline was made with a different configuration: checking it as the scenario stands is refused
    # (exit 2, one line) rather than reported as a regression of the model
    capsys.readouterr()
    assert main(["check", "--baseline", str(d), "--scenario", "small_mask"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_committed_scenarios_load_and_every_one_has_a_baseline():
    d = REPO / "results" / "baselines"
    for s in regress.load_scenarios(d):
        regress.read_baseline(d, s.name)


def test_a_metric_that_becomes_undefined_is_a_change(baseline_dir):
    # e.g. a change after which no shootdown completes: latency is NaN
    s = regress.load_scenarios(baseline_dir)[0]
    base = regress.read_baseline(baseline_dir, s.name)
    cur = json.loads(json.dumps({k: base[k] for k in ("exact", "statistical")}))
    cur["exact"]["metrics"]["latency_p99_us"] = float("nan")
    cur["statistical"]["metrics"]["latency_p99_us"][3] = float("nan")
    rows = {(r.tier, r.metric): r for r in regress.compare(s, base, cur)}
    assert rows[("exact", "latency_p99_us")].failed
    assert rows[("statistical", "latency_p99_us")].failed
    assert not rows[("statistical", "latency_p50_us")].failed
    # undefined in both baseline and current: holds
    base2 = json.loads(json.dumps(cur))
    assert not any(r.failed for r in regress.compare(s, base2, cur))


def test_vf_metrics_are_gated_when_the_scenario_has_vfs(baseline_dir, capsys):
    # turning the VF model on adds metrics the baseline never measured: a change, named
    rc, out = run_json(capsys, "--baseline", str(baseline_dir), "--scenario", "small_mask", "--tier", "exact",
                       "--set", "vf.count=1")
    assert rc == 1
    new = {r["metric"] for r in out["rows"] if r["verdict"] == "CHANGED (not in the baseline)"}
    assert new == set(regress.VF_METRICS)


def test_committed_vf_scenario_flags_a_slower_vmbus(capsys):
    # +20 % on the VMBus message latency moves VF latency (and only VF metrics in the statistical tier)
    d = REPO / "results" / "baselines"
    rc, out = run_json(capsys, "--baseline", str(d), "--scenario", "vf_backchannel", "--tier", "statistical",
                       "--set", "vf.vmbus_message_us=18.0")
    assert rc == 1
    changed = {r["metric"] for r in out["rows"] if r["verdict"] == "CHANGED"}
    assert "vf_latency_mean_us" in changed and changed <= set(regress.VF_METRICS)


def test_scenario_file_errors_and_stale_baselines(tmp_path, capsys):
    import shutil

    from tlbsim.cli import main

    d = tmp_path / "b"
    shutil.copytree(REPO / "results" / "baselines", d)
    text = (d / "scenarios.toml").read_text()
    text = text.replace('config = "../../experiments', f'config = "{(REPO / "experiments").as_posix()}', )
    text = text.replace('../../experiments', '')  # every config path is now absolute
    (d / "scenarios.toml").write_text(text)
    # a stale baseline: the scenario's config changed since it was written
    edited = text.replace('"workload.policy" = "mask" }', '"workload.policy" = "mask", "partition.vps" = 12 }', 1)
    (d / "scenarios.toml").write_text(edited)
    assert main(["check", "--baseline", str(d), "--scenario", "dedicated_mask", "--tier", "exact"]) == 2
    assert "another configuration" in capsys.readouterr().err
    bads = ("replications = 0", "replications = 1", "set = 5", "seed = -3", 'thresholds = { latency_p99_us = "x" }')
    for bad in bads:
        (d / "scenarios.toml").write_text(text + f"\n[scenario.bad]\n{bad}\n")
        assert main(["check", "--baseline", str(d), "--scenario", "bad"]) == 2
        err = capsys.readouterr().err
        assert "scenario bad" in err and "Traceback" not in err, (bad, err)
    (d / "scenarios.toml").write_text(text)
    assert main(["check", "--update", "--baseline", str(d), "--scenario", "nonexistent"]) == 2
