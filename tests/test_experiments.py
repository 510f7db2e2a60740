"""Experiments and analysis: every shipped spec is valid, plots render, the
notebook executes end to end against a small sweep this test runs."""

import json
import math
import re
from pathlib import Path

import pytest

from tlbsim.plots import load_sweep, plot_sweep
from tlbsim.sweep import SweepSpec, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_is_valid(path):
    spec = SweepSpec.from_toml(path)
    assert spec.points and spec.replications >= 1
    assert spec.source.get("plot", {}).get("kind")


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """The headline spec, shrunk: 2 replications, 20 ms, 1, 2 and 4 identical 8-VP guests on 8 LPs."""
    spec = SweepSpec.from_toml(ROOT / "experiments" / "overcommit.toml", replications=2)
    source = dict(spec.source)
    source["fixed"] = {**source["fixed"], "partition.duration_us": 20000.0, "partition.vps": 8,
                       "partition.lps": 8}
    source["grid"] = {**source["grid"], "host.guests": [1, 2, 4]}
    source["replications"] = 2
    source["base"] = str(ROOT / "experiments" / "configs" / "default.toml")
    out = tmp_path_factory.mktemp("sweep") / "overcommit"
    run_sweep(SweepSpec.from_dict(source), out, jobs=2, progress=False)
    return out


def test_plots_render_png_and_svg(small_sweep, tmp_path):
    paths = plot_sweep(small_sweep, tmp_path)
    names = {p.name for p in paths}
    assert "latency_vs_overcommit.png" in names and "latency_vs_overcommit.svg" in names
    for p in paths:
        assert p.stat().st_size > 5000
    points, _, _ = load_sweep(small_sweep)
    assert set(points.vps_per_lp) == {1.0, 2.0, 4.0}


def _shrunk(path, out_root):
    """A shipped spec, shrunk to run in seconds: 2 replications, short runs (at most 8 ms), at most 3 values
    per axis, fewer when that still makes more than 40 points (the large-partitions study: 2 per axis)."""
    spec = SweepSpec.from_toml(path, replications=2)
    source = dict(spec.source)
    fixed = source.get("fixed", {})
    source["fixed"] = {**fixed, "partition.duration_us": min(8000.0, fixed.get("partition.duration_us", 8000.0))}
    keep = 3
    while keep > 1 and math.prod(min(len(v), keep) for v in source.get("grid", {}).values()) \
            * min([len(v) for v in source.get("zip", {}).values()] + [keep]) > 40:
        keep -= 1
    source["grid"] = {k: v[:keep] for k, v in source.get("grid", {}).items()}
    source["zip"] = {k: v[:keep] for k, v in source.get("zip", {}).items()}
    source["replications"] = 2
    source["base"] = str(ROOT / "experiments" / "configs" / "default.toml")
    out = out_root / spec.name
    run_sweep(SweepSpec.from_dict(source), out, jobs=2, progress=False)
    return out


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_notebook_reads_every_shipped_sweep(path, tmp_path):
    """The notebook runs on each shipped experiment (shrunk) and its key table has a row per
    (policy, varied parameters) combination."""
    out = _shrunk(path, tmp_path)
    nb = _execute_notebook(out)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    points, _, manifest = load_sweep(out)
    combos = points.groupby([k for k in ("workload.policy",) if k in points]
                            + [k for k in [*manifest["spec"].get("grid", {}), *manifest["spec"].get("zip", {})]
                               if k != "workload.policy"]).ngroups
    key_table = nb.cells[5].outputs[-1]["data"]["text/plain"]
    assert len([line for line in key_table.splitlines()[2:] if line.strip()]) >= combos


def _execute_notebook(results: Path):
    """notebooks/analysis.ipynb run from notebooks/ with TLBSIM_RESULTS = ``results``; the executed notebook
    (skips the test when nbformat / nbclient are missing). The shipped notebook must hold no outputs, and
    running it must write nothing to stderr: every warning is shown (PYTHONWARNINGS=default, deprecations
    from libraries included), so any warning fails the test."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store the notebook without outputs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLBSIM_RESULTS", str(results))
        mp.setenv("PYTHONWARNINGS", "default")
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    stderr = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr, f"the notebook warned: {stderr}"
    return nb


def test_notebook_executes_end_to_end(small_sweep):
    nb = _execute_notebook(small_sweep)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o.get("text", "") for o in outputs])
    assert "0 failed runs" in text
    # every column the notebook's text names (`snake_case` in its markdown) is one a reader will find
    from tlbsim.model.vf import VF_COLUMNS

    points, shootdowns, _ = load_sweep(small_sweep)
    columns = {*points.columns, *shootdowns.columns, *VF_COLUMNS}
    named = {n for c in nb.cells if c.cell_type == "markdown"
             for n in re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", c.source)}
    assert named and not named - columns, f"the notebook names columns that do not exist: {named - columns}"


def test_vf_experiment_writes_vf_rows_and_its_figures(tmp_path):
    spec = SweepSpec.from_toml(ROOT / "experiments" / "vf.toml", replications=2)
    source = dict(spec.source)
    source["fixed"] = {**source["fixed"], "partition.duration_us": 10000.0, "partition.vps": 4}
    source["grid"] = {"vf.pf_call_rate_per_ms": [2.0, 40.0], "vf.flush_blocks": [0, 1]}
    source["replications"] = 2
    source["base"] = str(ROOT / "experiments" / "configs" / "default.toml")
    out = tmp_path / "vf"
    outcome = run_sweep(SweepSpec.from_dict(source), out, jobs=1, progress=False)
    assert not outcome.failed
    from tlbsim import load_results

    tables = load_results(out)
    vf = tables["vf"]
    assert set(vf["point"]) == {0, 1, 2, 3} and set(vf["replication"]) == {0, 1}
    # one VF row per PF call: the points table counts the same calls
    per_run = vf.groupby(["point", "replication"]).size()
    pts = tables["points"].set_index(["point", "replication"])["vf_calls"]
    assert (per_run == pts.loc[per_run.index]).all()
    # faster PF calls coalesce more
    ratio = tables["points"].groupby("vf.pf_call_rate_per_ms")["vf_coalescing_ratio"].mean()
    assert ratio[40.0] > ratio[2.0]
    names = {p.name for p in plot_sweep(out, tmp_path / "fig")}
    assert {"vf_latency_vs_rate.png", "vf_coalescing_vs_rate.svg", "shootdown_latency_vs_vf_rate.png"} <= names


def test_pooled_quantiles_pool_replications_and_bootstrap_them(small_sweep):
    import numpy as np

    from tlbsim.plots import pooled_quantiles

    points, shootdowns, _ = load_sweep(small_sweep)
    q = pooled_quantiles(points, shootdowns, "vps_per_lp", "workload.policy", boot=50)
    row = q[(q["workload.policy"] == "mask") & (q["vps_per_lp"] == 1.0)].iloc[0]
    keep = points[(points["workload.policy"] == "mask") & (points["vps_per_lp"] == 1.0)][["point", "replication"]]
    lat = shootdowns.merge(keep, on=["point", "replication"])
    lat = lat[lat.status == "SUCCESS"].latency_us  # no incomplete ones at 1:1 in this sweep
    assert row["q0.99"] == pytest.approx(np.quantile(lat, 0.99))
    assert row["q0.99_lo"] <= row["q0.99"] <= row["q0.99_hi"]


def test_cdf_figure_has_a_tail_view_fixed_policy_order_and_counts_incomplete(monkeypatch, tmp_path):
    """Synthetic data: 'mask' has 4 shootdowns of which 1 never completed, 'ipi' 2; policies appear in
    the fixed order with their fixed colours whatever order the data has; the CDF of 'mask' stops at 3/4
    (the incomplete one is censored, not dropped) and its tail view ends at 2/4 (the slowest completed
    one and the incomplete one are both at least 30 us)."""
    import matplotlib.colors as mcolors
    import pandas as pd

    import tlbsim.plots as plots

    captured = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: captured.setdefault("fig", fig) and [])
    points = pd.DataFrame({"point": [0, 1], "replication": [0, 0], "status": ["ok", "ok"],
                           "workload.policy": ["mask", "ipi"]})
    shootdowns = pd.DataFrame({
        "point": [0, 0, 0, 0, 1, 1], "replication": [0] * 6,
        "status": ["SUCCESS", "SUCCESS", "INCOMPLETE", "SUCCESS", "SUCCESS", "SUCCESS"],
        "latency_us": [10.0, 30.0, float("nan"), 20.0, 5.0, 50.0]})
    plots.cdf_figure(points, shootdowns, tmp_path)
    cdf, tail = captured["fig"].axes
    labels = [t.get_text() for t in cdf.get_legend().get_texts()]
    assert labels == ["ipi (n=2)", "mask (n=4, 1 in flight)"]
    ipi_line, mask_line = cdf.get_lines()
    assert mcolors.to_hex(mask_line.get_color()) == plots.POLICY_COLOURS["mask"]
    assert list(mask_line.get_xdata()) == [10.0, 20.0, 30.0]
    assert mask_line.get_ydata()[-1] == pytest.approx(0.75)
    assert tail.get_yscale() == "log" and tail.get_xscale() == "log"
    mask_tail = tail.get_lines()[1]
    assert list(mask_tail.get_ydata()) == pytest.approx([1.0, 0.75, 0.5])
