"""Fuzz the edges a user types into (config keys, --set values, seeds, workload and VF traces, sweep specs):
every input ends in exit 0, or
exit 2 with one line naming the problem; never a traceback, never a hang (run.max_events bounds every
run; a small budget here keeps each example fast)."""

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlbsim import Config
from tlbsim.cli import main
from tlbsim.sweep import flatten

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "experiments" / "configs" / "default.toml")
KEYS = sorted(flatten(Config().to_dict()))
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


# ------------------------------------------------------------------ traces
TOKENS = st.one_of(st.sampled_from(["0", "1", "-1", "nan", "inf", "-inf", "1e308", "1e-300", "0x10", "3.5", "",
                                    "18446744073709551616", "abc", '"', "\ufeff"]),
                   st.integers(-(2**70), 2**70).map(str), st.floats(allow_nan=True).map(repr))
HEADERS = st.sampled_from(["time_us,vp,address_space,pages", "\ufefftime_us,vp,address_space,pages",
                           "time_us,vp,pages", "vp,time_us,pages,address_space", ""])


def _own_space(vp: int) -> int:
    from tlbsim.model.partition import address_space_index

    return address_space_index(Config().with_overrides({"partition.vps": 8}), vp)


VALID_ROW = st.tuples(st.floats(0, 1500, allow_nan=False), st.integers(0, 7), st.integers(0, 64)).map(
    lambda r: [repr(r[0]), str(r[1]), str(_own_space(r[1])), str(r[2])])
ROWS = st.lists(st.one_of(VALID_ROW, VALID_ROW, VALID_ROW, st.lists(TOKENS, min_size=0, max_size=5)), max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(st.just("time_us,vp,address_space,pages"), HEADERS), rows=ROWS)
def test_any_workload_trace_is_run_or_rejected_in_one_line(tmp_path_factory, capsys, header, rows):
    trace = tmp_path_factory.mktemp("trace") / "t.csv"
    trace.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    args = ["run", DEFAULT, *SAFE, "--set", f'workload.trace="{trace}"']
    rc = main_exits(args)
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err, (rows, err)
    if rc == 2:
        assert err.count("\n") <= 2, err


VF_HEADERS = st.sampled_from(["time_us,vf,block_mask", "time_us,vf", "vf,block_mask,time_us", ""])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=VF_HEADERS, rows=st.lists(st.lists(TOKENS, min_size=0, max_size=4), max_size=6))
def test_any_vf_trace_is_run_or_rejected_in_one_line(tmp_path_factory, capsys, header, rows):
    trace = tmp_path_factory.mktemp("vftrace") / "v.csv"
    trace.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    args = ["run", DEFAULT, *SAFE, "--set", "vf.count=1", "--set", f'vf.trace="{trace}"']
    rc = main_exits(args)
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err, (rows, err)


# ------------------------------------------------------------------ sweep specs
SPEC_VALUES = st.one_of(values, st.lists(values, max_size=3))
SAFE_FIXED = {"partition.duration_us": 1000.0, "run.max_events": 100000, "partition.vps": 4, "partition.lps": 4}


def spec_toml(spec: dict) -> str:
    lines, tables = [], []
    for k, v in spec.items():
        if isinstance(v, dict):
            tables.append(f"[{k}]\n" + "".join(f'"{a}" = {toml_literal(b)}\n' for a, b in v.items()))
        else:
            lines.append(f"{k} = {toml_literal(v)}")
    return "\n".join(lines) + "\n" + "\n".join(tables)


VALID_GRIDS = st.sampled_from([{}, {"workload.policy": ["mask", "ipi"]}, {"partition.slice_us": [1000.0, 3000.0]},
                                {"host.cotenants": [0, 1]}, {"workload.pages": [1, 64]}])
WEIRD = {
    "name": st.text(max_size=12),
    "replications": st.one_of(st.integers(-2, 2), st.floats(allow_nan=True), st.text(max_size=3)),
    "seed": st.one_of(st.integers(-5, 2**65), st.text(max_size=3)),
    "grid": st.dictionaries(st.sampled_from([*KEYS[:40], "no.such_key", "partition"]), SPEC_VALUES, max_size=2),
    "zip": st.dictionaries(st.sampled_from(["workload.policy", "partition.slice_us", "x"]),
                           st.lists(values, max_size=3), max_size=2),
    "extra": st.dictionaries(st.sampled_from(["fixed", "base", "plot", "unknown"]), values, max_size=1),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid=VALID_GRIDS, broken=st.sampled_from([None, *WEIRD]), data=st.data())
def test_any_sweep_spec_is_run_or_rejected_in_one_line(tmp_path_factory, capsys, grid, broken, data):
    """A valid small spec with at most one field made strange: it runs (0), runs with failed points
    recorded (1) or is refused in one line (2); never a traceback; nothing written outside --out."""
    fields = {"name": "fuzz", "replications": 1, "seed": 7, "grid": grid, "zip": {}, "extra": {}}
    if broken is not None:
        fields[broken] = data.draw(WEIRD[broken])
    name, replications, seed, grid, zipped, extra = (fields[k] for k in ("name", "replications", "seed", "grid",
                                                                        "zip", "extra"))
    d = tmp_path_factory.mktemp("spec")
    spec = {"name": name, "replications": replications, "seed": seed, "base": str(Path(DEFAULT)),
            "fixed": dict(SAFE_FIXED), "grid": grid, "zip": zipped, **extra}
    (d / "s.toml").write_text(spec_toml(spec))
    rc = main_exits(["sweep", str(d / "s.toml"), "--out", str(d / "out"), "--jobs", "1", "--no-progress"])
    err = capsys.readouterr().err
    # 0: ran; 1: ran, some runs failed (recorded per run, named on stderr); 2: the spec was refused
    assert rc in (0, 1, 2) and "Traceback" not in err, (spec, err)
    if rc == 2:
        assert err.count("\n") <= 2, err
    assert sorted(p.name for p in d.iterdir()) in (["s.toml"], ["out", "s.toml"])  # nothing written outside --out
