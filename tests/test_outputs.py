"""What `run --out` writes and what the README says it writes agree; readers cope with an absent VF
table; `validate` prints every check's full name."""

import json
import re
from pathlib import Path

import pandas as pd

from tlbsim import Result, load_results, validate
from tlbsim.cli import main
from tlbsim.results import TABLES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "experiments" / "configs" / "default.toml"


def _run(out: Path, *sets: str, force: bool = False) -> None:
    args = ["run", str(DEFAULT), "--seed", "2", "--no-progress", "--set", "partition.duration_us=5000",
            "--set", "partition.vps=4", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    assert main(args + (["--force"] if force else [])) == 0


def test_vf_table_is_written_only_when_the_vf_model_is_on_and_readers_cope(tmp_path, capsys):
    off, on = tmp_path / "off", tmp_path / "on"
    _run(off)
    assert not (off / "vf.parquet").exists()
    manifest = json.loads((off / "manifest.json").read_text())
    assert "vf" not in manifest["tables"]
    assert set(manifest["tables"].values()) == {p.name for p in off.glob("*.parquet")}
    loaded = Result.load(off)
    assert loaded.vf.empty and len(loaded.shootdowns)
    assert "vf" not in load_results(off) and {"shootdowns", "vps", "exits", "partitions"} <= set(load_results(off))

    _run(on, "vf.count=1", "vf.pf_call_rate_per_ms=2.0")
    assert (on / "vf.parquet").exists()
    assert json.loads((on / "manifest.json").read_text())["tables"]["vf"] == "vf.parquet"
    vf = load_results(on)["vf"]
    assert len(vf) == Result.load(on).summary["vf_calls"] > 0

    # the same directory again (--force) without VFs: the earlier run's VF table goes with it
    _run(on, force=True)
    assert not (on / "vf.parquet").exists() and Result.load(on).vf.empty
    capsys.readouterr()


def test_readme_out_paragraph_names_every_table_a_run_writes():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^- `--out DIR` writes(.*?)(?=^- `)", readme, flags=re.M | re.S)
    assert m, "the README has no `--out DIR` paragraph"
    paragraph = " ".join(m.group(1).split())
    for name in TABLES:
        assert f"`{name}.parquet`" in paragraph, name
    assert "`vf.count` > 0" in paragraph  # and when vf.parquet is there


def test_validate_table_prints_full_check_names():
    long_check = "a check whose name is much longer than thirty-four characters, in full"
    table = pd.DataFrame([
        {"case": "a_case_name_longer_than_twenty_two", "check": long_check, "kind": "ratio", "published": 1.0,
         "simulated": 1.01, "low": 0.99, "high": 1.03, "ratio_to_published": 1.01, "tolerance": 0.05,
         "verdict": "holds", "detail": "n=3"},
        {"case": "short", "check": "rises", "kind": "increasing", "published": None, "simulated": 2.0,
         "low": float("nan"), "high": float("nan"), "ratio_to_published": float("nan"), "tolerance": 0.0,
         "verdict": "MISS", "detail": "0.9991 -> 1.147 -> 1.2 -> 1.35 -> 1.5"}])
    text = validate.format_table(table)
    lines = text.splitlines()
    assert long_check in text and "a_case_name_longer_than_twenty_two" in text
    assert "0.9991 -> 1.147 -> 1.2 -> 1.35 -> 1.5" in text
    # columns stay aligned: every row's verdict starts where the header's does
    at = lines[0].index("verdict")
    assert lines[2][at:].startswith("holds") and lines[3][at:].startswith("MISS")
    assert lines[2].index(long_check) == lines[0].index("check")
