"""What a reader sees in a figure is true and legible: one colour per policy in every figure that draws
policies, every text inside the figure and clear of the others, plain-number log ticks, and every level
an ordering check compares drawn in its validation figure. Figures are drawn from synthetic data, so
these tests run in about a second."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tlbsim import plots, validate  # noqa: E402
from tlbsim.config import POLICIES  # noqa: E402

KINDS = ("overcommit", "mask_vs_all", "scaling", "locks", "generic", "vf")
LEVELS = (1, 2, 4, 8)


def synthetic_sweep(kind: str, reps: int = 3, seed: int = 0):
    """A sweep's (points, shootdowns, manifest) as load_sweep gives them: every policy at four levels of
    whatever the figures of ``kind`` put on their x axis, latencies spanning decades."""
    rng = np.random.default_rng(seed)
    rows, sds = [], []
    point = 0
    for i, policy in enumerate(POLICIES):
        for level in LEVELS:
            for rep in range(reps):
                lat = 2.0 * (1 + i) * level ** (1 + 0.3 * i) * rng.lognormal(0, 0.2)
                rows.append({
                    "point": point, "replication": rep, "status": "ok", "workload.policy": policy,
                    "workload.mode": "closed", "duration_us": 20000.0, "vps_per_lp": float(level),
                    "partition.vps": 16 if kind == "mask_vs_all" else 4 * level, "fraction_targeted": level / 8,
                    "locks.vsm_rate_per_ms": 0.5 * level, "vf.pf_call_rate_per_ms": 2.0 * level,
                    "vf.flush_blocks": rep % 2, "latency_p50_us": lat, "latency_p99_us": 30 * lat,
                    "lp_work_fraction": 1 - 0.02 * i * level, "guest_work_fraction": 0.9 - 0.01 * i * level,
                    "ops_per_s": 1000.0 / (1 + i * level), "cost_per_shootdown_us": 5 * lat,
                    "suspensions_per_shootdown": 0.1 * level, "suspended_us_per_shootdown": 3.0 * level,
                    "vf_latency_p50_us": 20.0 * level, "vf_latency_p99_us": 400.0 * level,
                    "vf_coalescing_ratio": 1 + 0.2 * level, "vf_oid_backlog_max": float(level),
                    "vf_vp_time_us": 100.0 * level})
                n = 40
                status = np.where(np.arange(n) < 2 * i, "INCOMPLETE", "SUCCESS")
                sds.append(pd.DataFrame({
                    "point": point, "replication": rep, "status": status,
                    "latency_us": np.where(status == "SUCCESS", lat * rng.lognormal(0, 1.0, n), np.nan),
                    "issue_us": rng.uniform(0, 20000.0, n)}))
            point += 1
    grid = {"generic": {"workload.policy": list(POLICIES), "partition.vps": [4 * v for v in LEVELS]}}
    plot = {"kind": kind}
    if kind == "vf":
        plot.update(x="vf.pf_call_rate_per_ms", hue="vf.flush_blocks")
    manifest = {"spec": {"plot": plot, "grid": grid.get(kind, {})}}
    return pd.DataFrame(rows), pd.concat(sds, ignore_index=True), manifest


def draw_sweep(kind: str, monkeypatch):
    """Every figure plot_sweep draws for a sweep of ``kind``, by name, open (not saved)."""
    figures = {}
    data = synthetic_sweep(kind)
    monkeypatch.setattr(plots, "load_sweep", lambda directory: data)
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figures.setdefault(name, fig) and [])
    plots.plot_sweep("unused", "unused")
    assert figures
    return figures


def _drawn_tick_labels(axis):
    """The tick labels the axis draws: in its view, with text."""
    lo, hi = sorted(axis.get_view_interval())
    index = 0 if axis.axis_name == "x" else 1
    return [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text().strip()
            and lo * (1 - 1e-9) - 1e-12 <= t.get_position()[index] <= hi * (1 + 1e-9) + 1e-12]


def _texts(fig):
    """(name, Text) of everything a reader reads: titles, axis labels, drawn tick labels, legends, notes."""
    out = []
    if fig._suptitle is not None and fig._suptitle.get_text():
        out.append(("suptitle", fig._suptitle))
    for n, ax in enumerate(fig.axes):
        for what, t in (("title", ax.title), ("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label)):
            if t.get_text():
                out.append((f"axes {n} {what}", t))
        for axis in (ax.xaxis, ax.yaxis):
            out += [(f"axes {n} {axis.axis_name} tick {t.get_text()!r}", t) for t in _drawn_tick_labels(axis)]
        if ax.get_legend():
            out += [(f"axes {n} legend {t.get_text()!r}", t) for t in ax.get_legend().get_texts()]
        out += [(f"axes {n} note {t.get_text()!r}", t) for t in ax.texts if t.get_text()]
    return out


def assert_legible(fig, name=""):
    """Every text lies inside the figure, and no two texts a reader reads overlap (a tick label on
    another, an axis label on a title, ...)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    texts = [(n, t, t.get_window_extent(renderer)) for n, t in _texts(fig)]
    assert texts
    for n, _t, box in texts:
        assert (box.x0 >= frame.x0 - 1 and box.y0 >= frame.y0 - 1 and box.x1 <= frame.x1 + 1
                and box.y1 <= frame.y1 + 1), f"{name}: {n} is cut by the figure's edge ({box} outside {frame})"
    for i, (n1, _t1, b1) in enumerate(texts):
        for n2, _t2, b2 in texts[i + 1:]:
            overlap_x = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
            overlap_y = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
            assert not (overlap_x > 1 and overlap_y > 1), f"{name}: {n1} overlaps {n2}"


def assert_plain_log_ticks(fig, name=""):
    """Log axes read 1, 10, 100 (or 0.01): plain numbers equal to their tick positions, no 10^k."""
    fig.canvas.draw()
    logs = 0
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "log":
                continue
            logs += 1
            labels = _drawn_tick_labels(axis)
            assert labels, f"{name}: a log axis with no tick labels"
            index = 0 if axis.axis_name == "x" else 1
            for t in labels:
                text = t.get_text()
                assert "$" not in text and "^" not in text, f"{name}: tick label {text!r} is not a plain number"
                assert float(text.replace(",", "")) == pytest.approx(t.get_position()[index], rel=1e-3)
    return logs


def _line_policy(line):
    label = line.get_label()
    return label.split()[0] if not label.startswith("_") and label.split() else None


def test_the_palette_covers_every_policy_with_distinct_colours():
    assert set(plots.POLICY_COLOURS) == set(POLICIES) == set(plots.POLICY_ORDER)
    assert len({mcolors.to_hex(c) for c in plots.POLICY_COLOURS.values()}) == len(POLICIES)


@pytest.mark.parametrize("kind", KINDS)
def test_every_sweep_figure_draws_each_policy_in_its_palette_colour(kind, monkeypatch):
    seen = set()
    for name, fig in draw_sweep(kind, monkeypatch).items():
        for ax in fig.axes:
            for line in ax.get_lines():
                policy = _line_policy(line)
                if policy in plots.POLICY_COLOURS:
                    seen.add(policy)
                    assert mcolors.to_hex(line.get_color()) == plots.POLICY_COLOURS[policy], (name, line.get_label())
        if name.startswith("latency_cdf"):  # the tail panel's curves are unlabelled: the CDF panel's colours
            cdf, tail = fig.axes
            steps = [mcolors.to_hex(x.get_color()) for x in tail.get_lines() if x.get_linestyle() != ":"]
            assert steps == [mcolors.to_hex(x.get_color()) for x in cdf.get_lines()]
        plt.close(fig)
    if kind != "vf":  # the VF figures draw series of a VF parameter, not policies
        assert seen == set(POLICIES), kind


@pytest.mark.parametrize("kind", KINDS)
def test_every_sweep_figure_is_legible_with_plain_log_ticks(kind, monkeypatch):
    logs = 0
    for name, fig in draw_sweep(kind, monkeypatch).items():
        assert_legible(fig, name)
        logs += assert_plain_log_ticks(fig, name)
        plt.close(fig)
    assert logs  # every kind draws latency on a log axis somewhere


@pytest.mark.parametrize("lo,hi,expect,absent", [
    (3.0, 30.0, {"5", "10", "20"}, {"3", "4"}),  # a decade: 2 and 5 labelled between the powers of ten
    (2.2, 4.5, {"3", "4"}, set()),  # under half a decade: every minor tick labelled
    (0.001, 20000.0, {"0.001", "1", "10,000"}, {"2", "5", "20"}),  # decades: the powers of ten alone
])
def test_log_ticks_are_plain_numbers_and_minor_labels_only_when_few(lo, hi, expect, absent):
    fig, ax = plots.new_figure((6.0, 4.0))
    ax.plot([lo, hi], [lo, hi])
    ax.set_yscale("log")
    plots.readable_log_axis(ax.yaxis)
    ax.set_ylim(lo, hi)
    assert_legible(fig)
    assert_plain_log_ticks(fig)
    labels = {t.get_text() for t in _drawn_tick_labels(ax.yaxis)}
    assert expect <= labels and not (absent & labels), labels
    plt.close(fig)


def test_the_old_layout_would_fail_the_legibility_check():
    """The check can fail: the guest-work label unwrapped on a short figure is cut by its edge."""
    fig, ax = plt.subplots(figsize=(7.6, 2.4))
    ax.plot([1, 2], [0.5, 0.9])
    ax.set_ylabel(plots.LABELS["lp_work_fraction"])
    with pytest.raises(AssertionError, match="cut by the figure's edge|overlaps"):
        assert_legible(fig)
    plt.close(fig)


def _trend_rows():
    """overcommit_trend's checks evaluated on synthetic runs: ops_per_s of each point per replication,
    the mask / ipi ratio rising with overcommit; returns (case, rows, expected mean ratio per level)."""
    case = validate.load_case(validate.CASE_DIR / "overcommit_trend.toml")
    labels = [label for label, _ in case.points]
    ops = {"ipi_1to1": 100.0, "mask_1to1": 100.0, "ipi_2to1": 80.0, "mask_2to1": 92.0, "ipi_4to1": 60.0,
           "mask_4to1": 75.0}
    rows = [{"point": labels.index(lbl), "replication": r, "status": "ok", "ops_per_s": v * (1 + 0.01 * r)}
            for lbl, v in ops.items() for r in range(4)]
    table = pd.DataFrame(validate.evaluate(case, pd.DataFrame(rows)))
    expected = [ops[f"mask_{k}"] / ops[f"ipi_{k}"] for k in ("1to1", "2to1", "4to1")]
    return case, table, expected


def test_overcommit_trend_figure_draws_every_level_it_checks():
    case, table, expected = _trend_rows()
    chain = table[table["kind"] == "increasing"].iloc[0]
    assert list(chain["levels"]) == ["mask_1to1/ipi_1to1", "mask_2to1/ipi_2to1", "mask_4to1/ipi_4to1"]
    assert list(chain["level_mean"]) == pytest.approx(expected)
    fig = validate.draw_figure(case, table)
    ax = fig.axes[0]
    simulated = [p for p in ax.patches if mcolors.to_hex(p.get_facecolor()) == validate.SIMULATED_COLOUR]
    published = [p for p in ax.patches if mcolors.to_hex(p.get_facecolor()) == validate.PUBLISHED_COLOUR]
    # the 1:1 check's pair, then one bar per overcommit level of the rising check, in order
    assert len(published) == 1 and len(simulated) == 1 + 3
    heights = [p.get_height() for p in sorted(simulated, key=lambda p: p.get_x())]
    assert heights[1:] == pytest.approx(expected)
    notes = [t.get_text() for t in ax.texts]
    for level in ("1to1", "2to1", "4to1"):
        assert any(f"mask_{level}" in n and f"ipi_{level}" in n for n in notes), notes
    assert_legible(fig, case.name)
    plt.close(fig)


def test_every_shipped_validation_figure_is_legible():
    """Each shipped case drawn from synthetic rows (every check holding at its published figure)."""
    for case in validate.load_cases():
        rows = []
        for chk in case.checks:
            row = {"case": case.name, "check": chk.label, "kind": chk.kind, "metric": chk.metric,
                   "published": chk.published, "verdict": "holds", "levels": list(chk.points),
                   "level_mean": [1.0 + i for i in range(len(chk.points))],
                   "level_low": [0.9 + i for i in range(len(chk.points))],
                   "level_high": [1.1 + i for i in range(len(chk.points))],
                   "compared": f"{chk.metric} of {chk.numerator}"}
            p = chk.published if chk.published is not None else math.nan
            row.update(simulated=p, low=0.95 * p, high=1.05 * p)
            rows.append(row)
        fig = validate.draw_figure(case, pd.DataFrame(rows))
        assert_legible(fig, case.name)
        plt.close(fig)


def test_sensitivity_figure_is_legible():
    from tlbsim import sensitivity

    spec = sensitivity.load_spec(validate.CASE_DIR.parent / "sensitivity" / "policy_choice.toml")
    rng = np.random.default_rng(1)
    indices = pd.concat([pd.DataFrame({"metric": m.name, "parameter": [p.key for p in spec.parameters],
                                       "mu_star": rng.uniform(0, 2, len(spec.parameters)),
                                       "mu_star_conf": rng.uniform(0, 0.5, len(spec.parameters))})
                         for m in spec.metrics], ignore_index=True)
    fig = sensitivity.draw_figure(spec, indices)
    assert_legible(fig, spec.name)
    plt.close(fig)



def synthetic_large_partitions(reps: int = 2):
    """A large_partitions sweep as load_sweep gives it: ALL's latency ratio to the mask falls with the active
    fraction when the other VPs idle and rises when they are busy (known, so the map can be checked)."""
    rows, sds = [], []
    point = 0
    variants = ((1, "none"), (2, "none"), (1, "invlpgb"), (1, "rar"))
    for policy in ("mask", "all", "linux"):
        for vps in (64, 256, 1024):
            for f in (1 / 64, 1 / 4, 1.0):
                for busy in (0, 1):
                    for over, mode in variants:
                        active = max(1, round(vps * f))
                        threads = vps if busy else active
                        ratio = (1 + (1 - f) * 3) if busy and f < 1 else (1 - 0.2 * f)  # f = 1: the same runs
                        base = 0.3 + 0.05 * active
                        lat = base * (ratio if policy == "all" else 1.0) / over * (0.5 if mode != "none" else 1)
                        for rep in range(reps):
                            noise = 1.0 + 0.01 * rep  # the same in every policy: exact ratios
                            rows.append({
                                "point": point, "replication": rep, "status": "ok", "workload.policy": policy,
                                "partition.vps": vps, "active_fraction": f, "workload.threads": threads,
                                "others_busy": busy,
                                "busy_vps_per_lp": float(over), "host.broadcast_flush": mode,
                                "costs.vp_set_per_bank_us": 0.05, "latency_p50_us": lat * noise,
                                "cost_per_shootdown_us": 3 * lat * noise,
                                "guest_work_fraction": 0.95 - (0.5 * (1 - f) if busy and policy == "all" else 0)})
                            n = 20
                            hc = np.full(n, 0.7 + (0.02 * active if policy == "mask" else 0.0))
                            sds.append(pd.DataFrame({"point": point, "replication": rep, "status": "SUCCESS",
                                                     "hypercall_us": hc + 0.07 * active, "fanout_us": 0.07 * active}))
                        point += 1
    manifest = {"spec": {"plot": {"kind": "large_partitions"}, "grid": {}}}
    return pd.DataFrame(rows), pd.concat(sds, ignore_index=True), manifest


def test_large_partition_figures_are_legible_in_palette_colours_and_map_the_true_ratios(monkeypatch):
    figures = {}
    data = synthetic_large_partitions()
    monkeypatch.setattr(plots, "load_sweep", lambda directory: data)
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figures.setdefault(name, fig) and [])
    plots.plot_sweep("unused", "unused")
    assert set(figures) == {"all_vs_mask", "latency_vs_vps", "guest_work_vs_vps", "broadcast_vs_vps",
                            "overcommit_vs_vps", "ex_call_cost"}
    for name, fig in figures.items():
        assert_legible(fig, name)
        if name != "all_vs_mask":
            assert assert_plain_log_ticks(fig, name)
        for ax in fig.axes:
            for line in ax.get_lines():
                policy = _line_policy(line)
                if policy and policy.rstrip(",") in plots.POLICY_COLOURS:
                    assert mcolors.to_hex(line.get_color()) == plots.POLICY_COLOURS[policy.rstrip(",")], name
    # the map: each cell's number is ALL / mask of the dedicated, no-broadcast runs; Ex where the set passes 64
    lat_idle, _cost_idle, lat_busy, _cost_busy = [ax for ax in figures["all_vs_mask"].axes if ax.images]
    cells = {t.get_text() for t in lat_idle.texts}
    assert "1.00" in cells  # a lone VP: no call differs
    assert f"{1 - 0.2:.2f} Ex" in cells  # all VPs share, 256 and 1,024 of them: Ex calls
    assert f"{1 + 3 * (1 - 1 / 4):.2f} Ex" in {t.get_text() for t in lat_busy.texts}  # 1/4 of 1,024 VPs, others busy
    assert not any("Ex" in t.get_text() for t in lat_idle.texts if t.get_position()[1] == 0)  # 64 VPs: never Ex
    ratios = plots.all_vs_mask_ratios(data[0], "latency_p50_us")
    assert len(ratios) == 3 * 3 * 2 and ratios["ratio"].between(0.7, 4.0).all()
    assert plots._others(data[0].drop(columns="others_busy")).tolist().count("busy") < (data[0].others_busy == 1).sum()
    for fig in figures.values():
        plt.close(fig)
