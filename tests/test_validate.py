"""tlbsim validate and tlbsim sensitivity: the shipped cases and study load and run, bad input is one
line and exit 2, a miss is exit 1, and docs/validation.md cannot drift from the model."""

import json
import re
from pathlib import Path

import pytest

from tlbsim import validate
from tlbsim.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_every_shipped_case_loads_and_cites_its_source():
    cases = validate.load_cases()
    assert len(cases) >= 5
    for c in cases:
        assert len(c.source) > 40 and c.mapping and c.reading and c.checks
        for chk in c.checks:
            assert chk.why, (c.name, chk.label)
    assert any(c.quick for c in cases)


def test_quick_validation_holds_and_writes_its_tables(tmp_path, capsys):
    rc = main(["validate", "--quick", "--json", "--out", str(tmp_path / "v"), "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] and out["rows"]
    assert (tmp_path / "v" / "validation.parquet").exists() and (tmp_path / "v" / "manifest.json").exists()
    assert list((tmp_path / "v" / "figures").glob("*.png"))


def test_a_known_miss_exits_1(tmp_path, capsys):
    rc = main(["validate", "openhcl_direct_flush", "--out", str(tmp_path / "v"), "--no-progress"])
    assert rc == 1 and "MISS" in capsys.readouterr().out


@pytest.mark.parametrize("text,message", [
    ('name = "x"\n', "[[point]]"),
    ('name = "x"\ntitle="t"\nsource="s"\nsetup="s"\nmapping="m"\nreading="r"\n[[point]]\nlabel="a"\n'
     '[[check]]\nkind="ratio"\nmetric="ops_per_s"\nnumerator="a"\ndenominator="b"\npublished=1.0\n', "'b'"),
    ('name = "x"\ntitle="t"\nsource="s"\nsetup="s"\nmapping="m"\nreading="r"\n[[point]]\nlabel="a"\n'
     '[[check]]\nkind="guess"\nmetric="m"\n', "kind"),
    ("not toml = = 1", "not valid TOML"),
])
def test_bad_case_files_are_one_line_and_exit_2(tmp_path, capsys, text, message):
    d = tmp_path / "cases"
    d.mkdir()
    (d / "x.toml").write_text(text)
    with pytest.raises(Exception, match=re.escape(message)):
        validate.load_cases(directory=d)


def test_unknown_case_name_exits_2(capsys):
    assert main(["validate", "no_such_case", "--no-progress"]) == 2
    assert "no validation case 'no_such_case'" in capsys.readouterr().err


def test_validation_doc_matches_the_model():
    """docs/validation.md records the fingerprint of the model sources and case files its numbers came
    from: after a change to either, `make validate` must regenerate it."""
    doc = (REPO / "docs" / "validation.md").read_text()
    m = re.search(r"Model fingerprint `([0-9a-f]+)`", doc)
    assert m, "docs/validation.md has no fingerprint line"
    assert m.group(1) == validate.fingerprint(validate.load_cases()), \
        "the model or a case changed since docs/validation.md was written: run `make validate`"
    for case in validate.load_cases():
        assert f"(`{case.name}`)" in doc and case.source in doc


def test_sensitivity_study_runs_small(tmp_path):
    from tlbsim import sensitivity

    spec_text = (REPO / "experiments" / "sensitivity" / "policy_choice.toml").read_text()
    spec_text = spec_text.replace("samples = 8", "samples = 2").replace('"partition.duration_us" = 30000.0',
                                                                         '"partition.duration_us" = 4000.0')
    spec_text = spec_text.replace('base = "../configs/default.toml"',
                                  f'base = "{(REPO / "experiments" / "configs" / "default.toml").as_posix()}"')
    path = tmp_path / "s.toml"
    path.write_text(spec_text)
    spec = sensitivity.load_spec(path)
    indices, figure = sensitivity.run(spec, tmp_path / "out", jobs=1, progress=False)
    assert set(indices["metric"]) == {"mask_over_ipi", "mask_over_all"}
    assert len(indices) == 2 * len(spec.parameters) and figure.exists()
    assert (indices["mu_star"] >= 0).all()
    # a parameter the metric cannot depend on has no effect: IPI costs do not touch mask vs all
    d = indices[(indices.metric == "mask_over_all") & (indices.parameter == "costs.vipi_send_us")]
    assert float(d["mu_star"].iloc[0]) == 0.0


@pytest.mark.parametrize("edit,message", [
    (("low = 1.2", "low = 3.0"), "low < high"),
    (('key = "costs.vipi_send_us"', 'key = "costs.no_such"'), "unknown config key"),
    (('method = "morris"', 'method = "fast"'), "morris"),
    (("samples = 8", "samples = 1"), "2..4096"),
])
def test_bad_sensitivity_specs_exit_2(tmp_path, capsys, edit, message):
    text = (REPO / "experiments" / "sensitivity" / "policy_choice.toml").read_text().replace(*edit)
    text = text.replace('base = "../configs/default.toml"',
                        f'base = "{(REPO / "experiments" / "configs" / "default.toml").as_posix()}"')
    path = tmp_path / "s.toml"
    path.write_text(text)
    assert main(["sensitivity", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
