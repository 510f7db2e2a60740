"""Fuzz the edges a user types into (config keys, --set values, seeds): every input ends in exit 0, or
exit 2 with one line naming the problem; never a traceback, never a hang (run.max_events bounds every
run; a small budget here keeps each example fast)."""

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlbsim import Config
from tlbsim.cli import main
from tlbsim.plots import _flatten

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "experiments" / "configs" / "default.toml")
KEYS = sorted(_flatten(Config().to_dict()))
ODD_NUMBERS = [0, -1, 1, 1e-9, 1e300, -1e300, 2**63, 2**64 + 1, 10**400, math.inf, -math.inf, math.nan, 0.5, 4096,
               4097, 1e6]

values = st.one_of(
    st.sampled_from(ODD_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.booleans(),
    st.lists(st.integers(min_value=-5, max_value=5000), max_size=5),
    st.recursive(st.integers(0, 3), lambda c: st.lists(c, max_size=3), max_leaves=30),
)


def toml_literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    return str(v)


SAFE = ["--set", "partition.duration_us=2000", "--set", "run.max_events=200000", "--set", "partition.vps=8",
        "--set", "partition.lps=8", "--no-progress"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=values)
def test_any_set_value_is_run_or_rejected_in_one_line(capsys, key, value):
    args = ["run", DEFAULT, *SAFE, "--set", f"{key}={toml_literal(value)}"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc in (0, 2), (args, rc, err)
    assert "Traceback" not in err
    if rc == 2:
        assert err.count("\n") <= 2 and err.startswith(("tlbsim", "usage")), err


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=30))
def test_any_override_text_is_parsed_or_rejected(capsys, text):
    # a text starting with "-" reads as an option to argparse, which rejects it with exit 2 (SystemExit)
    rc = main_exits(["run", DEFAULT, *SAFE, "--set", text])
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err


@pytest.mark.parametrize("seed", ["-1", "2**63", "abc", "18446744073709551616"])
def test_bad_seeds_exit_2(capsys, seed):
    assert main_exits(["run", DEFAULT, "--seed", seed, *SAFE]) == 2
    assert main_exits(["check", "--seed", seed]) == 2


def main_exits(args) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors exit 2
        return int(e.code)


def test_deeply_nested_lists_are_rejected_in_one_line(capsys):
    deep = "[" * 500 + "]" * 500
    rc = main(["run", DEFAULT, *SAFE, "--set", f"locks.vsm_vps={deep}"])
    assert rc == 2 and "Traceback" not in capsys.readouterr().err


def test_a_runaway_configuration_stops_with_a_clear_error(capsys):
    rc = main(["run", DEFAULT, "--no-progress", "--set", "run.max_events=5000", "--set", "partition.duration_us=1e9"])
    assert rc == 2 and "run.max_events" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [
    ("exits.memory_access.rate_per_ms", "1e300"), ("workload.burst_size", "1e308"), ("partition.slice_us", "1e-6"),
    ("vf.pf_call_rate_per_ms", "1e9"), ("locks.vsm_hold_mean_us", "inf"), ("costs.refill_us", "inf"),
    ("workload.pages", str(2**63)),
])
def test_extreme_values_found_by_fuzzing_are_bounded(capsys, key, value):
    assert main(["run", DEFAULT, *SAFE, "--set", f"{key}={value}"]) == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("body,message", [
    ("100,0,0,1\nnan,1,0,1\n", "finite"),
    ("100,0,0,1\ninf,1,0,1\n", "finite"),
    ("100,0,3,1\n", "runs address space 0"),
    (f"100,0,0,{2**63}\n", "pages at most"),
    (f"100,0,{2**63},1\n", "address_space at most"),
    ("100,0,0,99999999999999999999999999\n", "pages at most"),
])
def test_bad_trace_rows_are_one_line_errors(tmp_path, capsys, body, message):
    trace = tmp_path / "t.csv"
    trace.write_text("time_us,vp,address_space,pages\n" + body)
    rc = main(["run", DEFAULT, *SAFE, "--set", f'workload.trace="{trace.as_posix()}"'])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_a_byte_order_mark_is_not_a_column_name(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_bytes("\ufefftime_us,vp,address_space,pages\n100,0,0,1\n".encode())
    assert main(["run", DEFAULT, *SAFE, "--set", f'workload.trace="{trace.as_posix()}"']) == 0
    config = tmp_path / "c.toml"
    config.write_bytes("\ufeff[partition]\nvps = 4\n".encode())
    assert main(["run", str(config), "--no-progress", "--set", "partition.duration_us=1000"]) == 0
