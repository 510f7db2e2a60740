"""The standard figures of a sweep, used by `tlbsim plot`, experiments/ and notebooks/.

Every figure: labelled axes with units, a legend, a 95 % confidence band
from the replications (Student t on the replication means), log scales
where latency spans decades, with plain-number ticks (1, 10, 100 us). Each
policy has one colour in every figure (``POLICY_COLOURS``), and every text
lies inside the figure (constrained layout, long labels wrapped). Saved as
PNG and SVG.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tlbsim.config import Config, apply_overrides  # noqa: E402
from tlbsim.stats import t_quantile  # noqa: E402
from tlbsim.sweep import flatten  # noqa: E402

LABELS = {
    "latency_mean_us": "shootdown latency, mean (us)",
    "latency_p50_us": "shootdown latency, p50 (us)",
    "latency_p99_us": "shootdown latency, p99 (us)",
    "guest_work_fraction": "useful guest work, share of the partition's VP time",
    "lp_work_fraction": "useful guest work, share of the partition's fair LP capacity",
    "vps_per_lp": "VPs per logical processor (all partitions)",
    "ops_per_s": "operations (work + shootdown) per second",
    "shootdown_time_fraction": "share of VP time taken by shootdowns",
    "host.cotenants": "co-tenant partitions",
    "host.guests": "guest partitions",
    "partition.vps": "virtual processors",
    "fraction_targeted": "fraction of VPs targeted",
    "active_fraction": "share of the VPs in the address space's active set",
    "active_vps": "VPs in the address space's active set",
    "cost_per_shootdown_us": "guest time lost per shootdown, all VPs (us)",
    "suspensions_per_shootdown": "suspensions per shootdown",
    "suspended_us_per_shootdown": "time suspended per shootdown (us)",
    "locks.vsm_rate_per_ms": "VSM TlbLocked episodes per ms per VP",
    "exits.memory_access.rate_per_ms": "MemoryAccess exits per ms of guest time",
    "vf.pf_call_rate_per_ms": "PF NdisMInvalidateConfigBlock calls per ms",
    "vf_latency_p50_us": "VF latency, p50 (us)",
    "vf_latency_p99_us": "VF latency, p99 (us)",
    "vf_coalescing_ratio": "PF calls per notification (1 = no coalescing)",
    "vf_oid_backlog_max": "most invalidate OIDs queued at the VF miniport",
    "vf_vp_time_fraction": "service VP time spent on VF work (fraction)",
}


#: the order policies are drawn and listed in, in every figure
POLICY_ORDER = ("ipi", "kvm-pv", "linux", "mask", "all")
#: one fixed colour per policy (every one of tlbsim.config.POLICIES) in every figure that draws policies:
#: the sweep figures here, and anything else that draws a policy should take its colour from here
POLICY_COLOURS = {"ipi": "#d62728", "kvm-pv": "#2ca02c", "linux": "#9467bd", "mask": "#1f77b4", "all": "#ff7f0e"}


def policy_order(present) -> list:
    """The policies in ``present`` in POLICY_ORDER, any others after them, sorted."""
    present = set(present)
    return [p for p in POLICY_ORDER if p in present] + sorted(present - set(POLICY_ORDER), key=str)


def _plain(value: float) -> str:
    """A tick value as a plain number: 0.01, 1, 10, 1,000 (not 10^k)."""
    return f"{value:,.0f}" if abs(value) >= 1 else f"{value:.6g}"


def readable_log_axis(axis, base: float = 10) -> None:
    """Plain-number ticks on a log axis: the powers of ``base`` as 1, 10, 100 (or 1, 2, 4 for base 2);
    minor ticks labelled only when the view spans little more than a decade (2 and 5; every one below
    half a decade), so they can neither crowd nor overlap the major labels."""
    ticker = matplotlib.ticker
    axis.set_major_locator(ticker.LogLocator(base=base))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _plain(v)))
    if base != 10:
        axis.set_minor_formatter(ticker.NullFormatter())
        return
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(2, 10)))

    def minor(value: float, _pos) -> str:
        lo, hi = sorted(axis.get_view_interval())
        if lo <= 0 or value <= 0:
            return ""
        decades = np.log10(hi / lo)
        mantissa = value / 10 ** np.floor(np.log10(value) + 1e-9)
        keep = range(2, 10) if decades <= 0.5 else (2, 5) if decades <= 1.2 else ()
        return _plain(value) if any(abs(mantissa - k) < 1e-6 for k in keep) else ""

    axis.set_minor_formatter(ticker.FuncFormatter(minor))


def wrap(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters (existing line breaks kept)."""
    return "\n".join(line for part in text.split("\n") for line in (textwrap.wrap(part, width) or [""]))


def new_figure(figsize: tuple[float, float], ncols: int = 1):
    """A figure with constrained layout: labels, titles and outside legends are fitted inside it."""
    return plt.subplots(1, ncols, figsize=figsize, layout="constrained")


def t95(n: int) -> float:
    """Two-sided 95 % Student t critical value for a mean of n replications."""
    return t_quantile(0.975, n - 1) if n >= 2 else float("nan")


def load_sweep(directory: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(points with every config key and derived columns, shootdowns, manifest)."""
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest.get("kind") != "tlbsim-sweep":
        raise ValueError(f"{directory} is not a sweep (manifest kind {manifest.get('kind')!r})")
    points = pd.read_parquet(directory / "points.parquet")
    shootdowns = pd.read_parquet(directory / "shootdowns.parquet")
    configs = {}
    for p in manifest["points"]:
        cfg = Config.from_dict(apply_overrides(manifest["base_config"], p["overrides"]))
        configs[p["point"]] = flatten(cfg.to_dict())
    cfg_frame = pd.DataFrame.from_dict(configs, orient="index")
    cfg_frame.index.name = "point"
    overlap = [c for c in cfg_frame.columns if c in points.columns]
    points = points.drop(columns=overlap).join(cfg_frame, on="point")
    points = add_derived(points)
    return points, shootdowns, manifest


def add_derived(points: pd.DataFrame) -> pd.DataFrame:
    p = points.copy()
    vps = p["partition.vps"]
    guests = p.get("host.guests", 1)
    guest_vps = vps * guests  # every guest partition's VPs (the summary covers them all)
    # every VP on the host: the guests' and the co-tenants'
    host_vps = guest_vps + (p["host.cotenants"] * p["host.cotenant_vps"] if "host.cotenants" in p else 0)
    p["vps_per_lp"] = host_vps / p["partition.lps"].clip(upper=host_vps)
    group = np.where(p["workload.sharing"] == "groups", p["workload.group_size"].clip(upper=vps),
                     np.where(p["workload.sharing"] == "all", vps, 1))
    p["fraction_targeted"] = group / vps
    # the active set (workload.threads: VPs 0..threads-1 run a thread, the rest idle) and the busy VPs per LP
    threads = p["workload.threads"].where(p["workload.threads"] > 0, vps) if "workload.threads" in p else vps
    p["active_fraction"] = np.minimum(group, threads) / vps
    busy = threads * guests + (p["host.cotenants"] * p["host.cotenant_vps"] if "host.cotenants" in p else 0)
    p["busy_vps_per_lp"] = busy / p["partition.lps"]
    n = p["shootdowns_completed"].replace(0, np.nan)
    # cost_per_shootdown_us comes from the summary (records.summarize): every cost a policy causes
    p["suspensions_per_shootdown"] = p["suspensions"] / n
    p["suspended_us_per_shootdown"] = p["suspended_us"] / n
    # useful guest work as a fraction of the partition's fair share of the LPs (its VPs' share of all the
    # host's VPs): 1.0 = its share of the LPs busy with useful guest work. guest_work_fraction is the
    # share of the partition's VP time (it cannot exceed LPs / VPs under overcommit).
    fair_lps = p["partition.lps"].clip(upper=host_vps) * guest_vps / host_vps
    p["lp_work_fraction"] = p["guest_work_fraction"] * guest_vps / fair_lps
    return p


def summarize_reps(points: pd.DataFrame, x: str, metric: str, hue: str | None, log: bool = False) -> pd.DataFrame:
    """Centre and 95 % interval (lo, hi) of ``metric`` over replications at each (hue, x).
    With ``log`` the interval is computed on log10 values (a geometric mean with a
    multiplicative band), which is what a log axis shows honestly."""
    ok = points[(points["status"] == "ok") & points[metric].notna()].copy()
    if log:
        ok = ok[ok[metric] > 0]
        ok[metric] = np.log10(ok[metric])
    keys = [k for k in (hue, x) if k]
    out = ok.groupby(keys, observed=True)[metric].agg(["mean", "std", "count"]).reset_index()
    half = np.array([t95(int(n)) * sd / np.sqrt(n) if n > 1 else np.nan
                     for sd, n in zip(out["std"], out["count"], strict=True)])
    lo, hi = out["mean"] - half, out["mean"] + half
    if log:
        out["mean"], lo, hi = 10 ** out["mean"], 10**lo, 10**hi
    out["lo"], out["hi"] = lo, hi
    return out


def line_plot(ax, points: pd.DataFrame, x: str, metric: str, hue: str | None = "workload.policy",
              style: str = "-", label_suffix: str = "", log: bool = False) -> None:
    s = summarize_reps(points, x, metric, hue, log)
    if hue == "workload.policy":  # policies in their fixed order and colours
        groups = [(name, s[s[hue] == name]) for name in policy_order(s[hue])]
    else:
        groups = s.groupby(hue, observed=True) if hue else [("", s)]
    for name, g in groups:
        g = g.sort_values(x)
        colour = POLICY_COLOURS.get(name) if hue == "workload.policy" else None
        line = ax.plot(g[x], g["mean"], style, marker="o", ms=4, label=f"{name}{label_suffix}",
                       **({"color": colour} if colour else {}))[0]
        if g["lo"].notna().any():
            ax.fill_between(g[x], g["lo"], g["hi"], color=line.get_color(), alpha=0.15, linewidth=0)


def _finish(fig, ax, x: str, y_label: str, title: str, logy: bool, logx: bool = False) -> None:
    """Labels (long ones wrapped to the axes), scales with plain-number ticks, grid, the legend outside
    on the right; the figure's constrained layout fits them all inside it."""
    ax.set_xlabel(wrap(LABELS.get(x, x), 70))
    ax.set_ylabel(wrap(y_label, 34))
    small = len(title) > 50 or "\n" in title
    ax.set_title(wrap(title, 80 if small else 55), fontsize=9 if small else 11)
    if logy:
        ax.set_yscale("log")
        readable_log_axis(ax.yaxis)
    if logx:
        ax.set_xscale("log", base=2)
        readable_log_axis(ax.xaxis, base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def pooled_quantiles(points: pd.DataFrame, shootdowns: pd.DataFrame, x: str, hue: str | None,
                     qs=(0.5, 0.99), boot: int = 200, seed: int = 0, response: bool = False) -> pd.DataFrame:
    """Quantiles of every shootdown pooled over the replications of each (hue, x), with a 95 %
    bootstrap interval that resamples whole replications (the unit of independence). Incomplete
    shootdowns count with the time they had waited at the end (censored: lower bounds). With
    ``response``: the time from arrival to completion of every arrival, those never started (QUEUED)
    with their queueing delay so far; ``incomplete_fraction`` is then of all arrivals."""
    keys = [k for k in (hue, x) if k]
    meta = points[points["status"] == "ok"][["point", "replication", "duration_us", *keys]]
    kept = ["SUCCESS", "INCOMPLETE", "QUEUED"] if response else ["SUCCESS", "INCOMPLETE"]
    columns = ["point", "replication", "status", "latency_us", "issue_us", *(["queue_us"] if response else [])]
    sd = shootdowns[shootdowns["status"].isin(kept)][columns].merge(meta, on=["point", "replication"])
    lat = sd["latency_us"].to_numpy(dtype=float).copy()
    inc = (sd["status"] == "INCOMPLETE").to_numpy()
    lat[inc] = np.maximum(sd["duration_us"].to_numpy(dtype=float)[inc] - sd["issue_us"].to_numpy(dtype=float)[inc],
                          0.0)
    if response:
        queued = (sd["status"] == "QUEUED").to_numpy()
        lat[queued] = 0.0
        lat += sd["queue_us"].to_numpy(dtype=float)
        inc = inc | queued
    sd = sd.assign(lat=lat, incomplete=inc)
    rng = np.random.default_rng(seed)
    rows = []
    for key, g in sd.groupby(keys, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        reps = [r["lat"].to_numpy() for _, r in g.groupby("replication")]
        pooled = np.concatenate(reps)
        row = dict(zip(keys, key, strict=True))
        row["incomplete_fraction"] = float(g["incomplete"].mean())
        draws = np.empty((boot, len(qs)))
        for b in range(boot):
            pick = rng.integers(0, len(reps), len(reps))
            draws[b] = np.quantile(np.concatenate([reps[i] for i in pick]), qs)
        for j, q in enumerate(qs):
            row[f"q{q}"] = float(np.quantile(pooled, q))
            row[f"q{q}_lo"], row[f"q{q}_hi"] = (float(v) for v in np.quantile(draws[:, j], [0.025, 0.975]))
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_latency_figure(points, shootdowns, x, out_dir, name: str, title: str, logx: bool = False,
                          response: bool = False) -> list[Path]:
    """p50 (solid) and p99 (dashed) of every shootdown pooled over replications, per policy; bands are
    95 % bootstrap intervals over replications; the legend gives the largest incomplete fraction. With
    ``response``: arrival to completion, every arrival counted (``pooled_quantiles``)."""
    hue = "workload.policy" if points["workload.policy"].nunique() > 1 else None
    q = pooled_quantiles(points, shootdowns, x, hue, response=response)
    fig, ax = new_figure((7.8, 4.4))
    groups = [(h, q[q[hue] == h]) for h in policy_order(q[hue])] if hue else [("", q)]
    for h, g in groups:
        g = g.sort_values(x)
        colour = POLICY_COLOURS.get(h)
        inc = g["incomplete_fraction"].max()
        tag = f" (up to {inc:.0%} {'unfinished' if response else 'incomplete'})" if inc > 0.005 else ""
        for qq, style in ((0.5, "-"), (0.99, "--")):
            ax.plot(g[x], g[f"q{qq}"], style, marker="o", ms=3, color=colour,
                    label=f"{h} p{int(qq * 100)}" + (tag if qq == 0.5 else ""))
            ax.fill_between(g[x], g[f"q{qq}_lo"], g[f"q{qq}_hi"], color=colour, alpha=0.15, linewidth=0)
    what = "shootdown response, arrival to completion (us)" if response else "shootdown latency (us)"
    note = ("every arrival counted; unfinished ones (in flight or never started) censored" if response
            else "shootdowns issued; incomplete ones counted as censored")
    _finish(fig, ax, x, f"{what}, pooled p50 solid, p99 dashed",
            f"{title}\nbands: 95 % bootstrap over replications; {note}", True, logx)
    return _save(fig, out_dir, name)


def p50_p99_figure(points, x, hue, prefix: str, out_dir, name: str, y_label: str, title: str,
                   logx: bool = False) -> list[Path]:
    """``{prefix}_p50_us`` solid and ``{prefix}_p99_us`` dashed, log y, one colour per hue."""
    fig, ax = new_figure((7.6, 4.2))
    line_plot(ax, points, x, f"{prefix}_p50_us", hue, "-", " p50", log=True)
    ax.set_prop_cycle(None)
    line_plot(ax, points, x, f"{prefix}_p99_us", hue, "--", " p99", log=True)
    _finish(fig, ax, x, y_label, title, True, logx)
    return _save(fig, out_dir, name)


def latency_figure(points, x, out_dir, name="latency", logx=False, title=None) -> list[Path]:
    hue = "workload.policy" if points["workload.policy"].nunique() > 1 else None
    return p50_p99_figure(points, x, hue, "latency", out_dir, name, "shootdown latency (us), p50 solid, p99 dashed",
                          title or "Shootdown latency", logx)


def metric_figure(points, x, metric, out_dir, name, logy=False, logx=False, title=None) -> list[Path]:
    fig, ax = new_figure((7.6, 4.2))
    hue = "workload.policy" if points["workload.policy"].nunique() > 1 else None
    line_plot(ax, points, x, metric, hue, log=logy)
    _finish(fig, ax, x, LABELS.get(metric, metric), title or LABELS.get(metric, metric), logy, logx)
    return _save(fig, out_dir, name)


def cdf_figure(points, shootdowns, out_dir, where: dict | None = None, name="latency_cdf", title=None):
    """Empirical distribution of shootdown latency per policy, all replications pooled: the CDF (left)
    and its tail 1 - F on log-log axes (right), where p99 and beyond are read. Shootdowns still
    incomplete at the end of a run are in the denominator but never reach the curve (their latency is
    only known to exceed the time they waited), so a curve that stops below 1 shows how many are
    missing; the legend gives the count, and how many arrivals were never started (QUEUED: no latency,
    counted in the response time). Policies in a fixed order, one colour each."""
    sel = points[points["status"] == "ok"] if "status" in points else points
    for k, v in (where or {}).items():
        sel = sel[sel[k] == v]
    keep = sel[["point", "replication", "workload.policy"]]
    every = shootdowns[shootdowns["status"].isin(["SUCCESS", "INCOMPLETE", "QUEUED"])].merge(
        keep, on=["point", "replication"])
    sd = every[every["status"] != "QUEUED"]
    fig, (ax, tail) = new_figure((10.4, 4.2), 2)
    for policy in policy_order(sd["workload.policy"]):
        g = sd[sd["workload.policy"] == policy]
        queued = int(((every["workload.policy"] == policy) & (every["status"] == "QUEUED")).sum())
        n = len(g)
        lat = np.sort(g.loc[g["status"] == "SUCCESS", "latency_us"].to_numpy(dtype=float))
        if not lat.size:
            continue
        f = np.arange(1, lat.size + 1) / n
        inc = n - lat.size
        label = (f"{policy} (n={n:,}" + (f", {inc:,} in flight" if inc else "")
                 + (f"; {queued:,} never started" if queued else "") + ")")
        colour = POLICY_COLOURS.get(policy)
        ax.step(lat, f, where="post", label=label, color=colour)
        # 1 - F just before each sample, so the last completed shootdown still shows (at 1/n or above)
        survive = 1.0 - np.concatenate([[0.0], f[:-1]])
        tail.step(lat, survive, where="post", color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("shootdown latency (us)")
    ax.set_ylabel("fraction of shootdowns <= latency")
    tail.set_xscale("log")
    tail.set_yscale("log")
    tail.set_xlabel("shootdown latency (us)")
    tail.set_ylabel("fraction of shootdowns >= latency (1 - F)")
    for axis in (ax.xaxis, tail.xaxis, tail.yaxis):
        readable_log_axis(axis)
    for q in (0.01, 0.001):
        tail.axhline(q, color="grey", lw=0.6, ls=":")
        tail.annotate(f"p{100 * (1 - q):g}", (1.0, q), xycoords=("axes fraction", "data"), ha="right",
                      va="bottom", fontsize=7, color="grey")
    cond = ", ".join(f"{LABELS.get(k, k)} = {v}" for k, v in (where or {}).items())
    fig.suptitle(title or f"Latency distribution{': ' + cond if cond else ''}", fontsize=10)
    ax.set_title("CDF", fontsize=9)
    tail.set_title("tail, log scale", fontsize=9)
    for a in (ax, tail):
        a.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return _save(fig, out_dir, name)


def _series(points: pd.DataFrame, hue_key: str | None) -> tuple[pd.DataFrame, str | None]:
    if not hue_key:
        return points, None
    data = points.copy()
    label = {v: f"{hue_key.split('.')[-1]} = {v}" for v in sorted(data[hue_key].unique())}
    # an ordered categorical: legends list 5, 20, 80, not "20.0", "5.0", "80.0"
    data["series"] = pd.Categorical(data[hue_key].map(label), categories=list(label.values()), ordered=True)
    return data, "series"


def vf_figures(points: pd.DataFrame, shootdowns: pd.DataFrame, out: Path, x: str, hue_key: str | None):
    """VF latency (p50, p99), coalescing and the OID backlog vs the PF call
    rate; shootdown latency and guest work with and without VF-driver flushes."""
    data, hue = _series(points, hue_key)
    data["vf_vp_time_fraction"] = data["vf_vp_time_us"] / data["duration_us"]
    paths = p50_p99_figure(data, x, hue, "vf_latency", out, "vf_latency_vs_rate",
                           "PF call -> VF has read every block (us)\np50 solid, p99 dashed",
                           "VF configuration-block invalidation latency", logx=True)
    for metric, name, logy in (("vf_coalescing_ratio", "vf_coalescing_vs_rate", False),
                               ("vf_oid_backlog_max", "vf_oid_backlog_vs_rate", True),
                               ("vf_vp_time_fraction", "vf_vp_time_vs_rate", False),
                               ("guest_work_fraction", "guest_work_vs_vf_rate", False)):
        fig, ax = new_figure((7.6, 4.2))
        line_plot(ax, data, x, metric, hue, log=logy)
        _finish(fig, ax, x, LABELS.get(metric, metric), LABELS.get(metric, metric), logy, True)
        paths += _save(fig, out, name)
    paths += p50_p99_figure(data, x, hue, "latency", out, "shootdown_latency_vs_vf_rate",
                            "shootdown latency (us), p50 solid, p99 dashed",
                            "Shootdowns while the VF back-channel runs", logx=True)
    return paths


# ---------------------------------------------------------------- large partitions
#: ALL_PROCESSORS / ProcessorMask ratios: the colour of the policy that wins (``all`` below 1, ``mask`` above)
ADVANTAGE_CMAP = matplotlib.colors.LinearSegmentedColormap.from_list(
    "all_vs_mask", [POLICY_COLOURS["all"], "#ffffff", POLICY_COLOURS["mask"]])
EX_FROM_VPS = 64  # a VP index >= 64 forces the Ex calls (HV_VP_SET) for a ProcessorMask


def _fraction_label(f: float) -> str:
    """1/64, 1/4, 1 (an active fraction as a reader writes it)."""
    return "1" if f >= 1 else f"1/{1 / f:g}" if (1 / f).is_integer() else f"{f:.3g}"


def _others(points: pd.DataFrame) -> pd.Series:
    """Whether the VPs outside the active set run (other processes) or idle, per run: the study's
    others_busy parameter where the sweep has it (an active set of every VP is then drawn in both rows),
    else whether more VPs run threads than the active set has."""
    if "others_busy" in points:
        return np.where(points["others_busy"].astype(bool), "busy", "idle")
    threads = points["workload.threads"].where(points["workload.threads"] > 0, points["partition.vps"])
    return np.where(threads > points["active_fraction"] * points["partition.vps"] + 0.5, "busy", "idle")


def _baseline(points: pd.DataFrame) -> pd.DataFrame:
    """Dedicated, no hardware broadcast: the runs the mask-vs-all comparisons are made on."""
    p = points[points["status"] == "ok"]
    if "busy_vps_per_lp" in p:
        p = p[p["busy_vps_per_lp"] <= 1.0]
    if "host.broadcast_flush" in p:
        p = p[p["host.broadcast_flush"] == "none"]
    return p


def all_vs_mask_ratios(points: pd.DataFrame, metric: str) -> pd.DataFrame:
    """mean(``metric`` with ALL_PROCESSORS) / mean(``metric`` with the mask) at each (others, VPs, active
    fraction) of the dedicated, no-broadcast runs; columns others, partition.vps, active_fraction, ratio,
    all, mask."""
    p = _baseline(points).assign(others=lambda d: _others(d))
    m = p.groupby(["others", "partition.vps", "active_fraction", "workload.policy"])[metric].mean()
    m = m.unstack("workload.policy")
    if not {"all", "mask"} <= set(m.columns):
        return pd.DataFrame(columns=["others", "partition.vps", "active_fraction", "ratio", "all", "mask"])
    out = m[["all", "mask"]].reset_index()
    out["ratio"] = out["all"] / out["mask"].where(out["mask"] > 0)
    return out


def advantage_figure(points: pd.DataFrame, out_dir, name: str = "all_vs_mask") -> list[Path]:
    """Where ALL_PROCESSORS beats the mask: ALL / mask of the p50 latency (left) and of the guest time a
    shootdown costs every VP together (right, cost_per_shootdown_us: interruptions, refills, collateral
    included), per partition size (rows of a map) and active fraction (columns), for the VPs outside the
    active set idle (top) and busy (bottom). Orange (below 1): ALL wins; blue: the mask wins. Cells whose
    active set reaches VP 64 are marked Ex (the mask needs the Ex call's HV_VP_SET)."""
    metrics = (("latency_p50_us", "p50 latency"), ("cost_per_shootdown_us", "guest time per shootdown"))
    tables = {m: all_vs_mask_ratios(points, m) for m, _ in metrics}
    others = [o for o in ("idle", "busy") if (tables[metrics[0][0]]["others"] == o).any()] or ["idle"]
    ratios = np.concatenate([t["ratio"].dropna().to_numpy() for t in tables.values()] + [np.ones(1)])
    logs = np.log2(ratios[ratios > 0])
    # two slopes: ALL's wins (a few tens of percent) are as visible as the mask's (up to tens of times)
    lo, hi = min(float(logs.min()), -0.5), max(float(logs.max()), 0.5)
    norm = matplotlib.colors.TwoSlopeNorm(0.0, lo, hi)
    fig, axes = plt.subplots(len(others), 2, figsize=(10.0, 1.2 + 2.6 * len(others)), layout="constrained",
                             squeeze=False)
    image = None
    for r, other in enumerate(others):
        for c, (metric, what) in enumerate(metrics):
            ax = axes[r][c]
            t = tables[metric]
            t = t[t["others"] == other]
            grid = t.pivot(index="partition.vps", columns="active_fraction", values="ratio").sort_index()
            image = ax.imshow(np.log2(grid.to_numpy(dtype=float)), cmap=ADVANTAGE_CMAP, norm=norm, aspect="auto",
                              origin="lower")
            for i, vps in enumerate(grid.index):
                for j, f in enumerate(grid.columns):
                    v = grid.iloc[i, j]
                    # the mask names a VP >= 64: the active set's own VPs 0..g-1, or (others busy) the other
                    # groups' above it
                    ex = " Ex" if (vps if other == "busy" else round(vps * f)) > EX_FROM_VPS else ""
                    ax.text(j, i, ("-" if not np.isfinite(v) else f"{v:.2f}") + ex, ha="center", va="center",
                            fontsize=7)
            ax.set_xticks(range(len(grid.columns)), [_fraction_label(f) for f in grid.columns])
            ax.set_yticks(range(len(grid.index)), [f"{v:,}" for v in grid.index])
            ax.set_xlabel(LABELS["active_fraction"], fontsize=8)
            ax.set_ylabel("virtual processors", fontsize=8)
            ax.set_title(f"{what}, VPs outside the set {other}", fontsize=9)
    bar = fig.colorbar(image, ax=axes, shrink=0.8, label="ALL / mask (log scale, two slopes)")
    ticks = [np.log2(v) for v in (0.25, 0.5, 0.7, 0.8, 0.9, 1, 2, 4, 8, 16, 32, 64) if lo <= np.log2(v) <= hi]
    bar.set_ticks(ticks, labels=[_plain(round(2.0 ** t, 2)) for t in ticks])
    fig.suptitle(wrap("ALL_PROCESSORS / ProcessorMask, dedicated LPs, no hardware broadcast: below 1 (orange) "
                      "ALL wins, above 1 (blue) the mask wins. Ex: the mask names a VP >= 64 (the Ex call's "
                      "HV_VP_SET)", 110), fontsize=10)
    return _save(fig, out_dir, name)


def _panel_lines(ax, data: pd.DataFrame, x: str, metric: str, styles: dict, key: str | None, log: bool) -> None:
    """One line per policy (its colour) and per value of ``key`` (its line style from ``styles``)."""
    for value, style in styles.items():
        sel = data if key is None else data[data[key] == value]
        if sel.empty:
            continue
        suffix = f", {value}" if key is not None else ""
        line_plot(ax, sel, x, metric, "workload.policy", style, suffix, log=log)


def size_panels_figure(points: pd.DataFrame, metric: str, out_dir, name: str, title: str,
                       key: str | None = None, styles: dict | None = None, where=None, logy: bool = True):
    """``metric`` vs partition size, one panel per active fraction, a line per policy (and per value of
    ``key``, drawn in ``styles``)."""
    data = points[points["status"] == "ok"] if where is None else where(points[points["status"] == "ok"])
    if key is None:
        data = _baseline(data)
    fractions = sorted(data["active_fraction"].unique())
    ncols = min(2, len(fractions)) or 1
    nrows = max(1, -(-len(fractions) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(10.4, 1.0 + 2.9 * nrows), layout="constrained", squeeze=False)
    for ax in axes.flat[len(fractions):]:
        ax.set_visible(False)
    for ax, f in zip(axes.flat, fractions, strict=False):
        _panel_lines(ax, data[data["active_fraction"] == f], "partition.vps", metric, styles or {"": "-"}, key,
                     logy)
        ax.set_title("active set: every VP" if f >= 1 else f"active set: {_fraction_label(f)} of the VPs", fontsize=9)
        ax.axvline(EX_FROM_VPS, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        readable_log_axis(ax.xaxis, base=2)
        if logy:
            ax.set_yscale("log")
            readable_log_axis(ax.yaxis)
        ax.set_xlabel(LABELS["partition.vps"], fontsize=8)
        ax.set_ylabel(wrap(LABELS.get(metric, metric), 30), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    legend: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), fontsize=8, frameon=False, loc="outside right upper")
    fig.suptitle(wrap(title, 110), fontsize=10)
    return _save(fig, out_dir, name)


def ex_call_figure(points: pd.DataFrame, shootdowns: pd.DataFrame, out_dir, name: str = "ex_call_cost"):
    """What a flush hypercall costs before its fan-out (entry, decode, the mask walk and, for the Ex call,
    the HV_VP_SET bank words: hypercall_us - fanout_us), per shootdown, vs the active set's size (VPs
    0..g-1, the others idle), mask and ALL (linux is one of them at each point), dedicated, no broadcast;
    the bank words' own share (ceil(set / 64) x costs.vp_set_per_bank_us) drawn beside it, and VP 64,
    where the Ex calls start."""
    base = _baseline(points)
    base = base[(base["workload.policy"].isin(["mask", "all"])) & (_others(base) == "idle")]
    base = base.assign(active_vps=lambda d: (d["active_fraction"] * d["partition.vps"]).round())
    base = base[["point", "replication", "workload.policy", "active_vps", "costs.vp_set_per_bank_us"]]
    sd = shootdowns[shootdowns["status"] == "SUCCESS"][["point", "replication", "hypercall_us", "fanout_us"]]
    sd = sd.merge(base, on=["point", "replication"])
    sd = sd.assign(entry_us=sd["hypercall_us"] - sd["fanout_us"])
    sd = sd[sd["hypercall_us"] > 0]  # IPI fallbacks and lone VPs make no call
    per_run = sd.groupby(["point", "replication", "workload.policy", "active_vps"],
                         as_index=False)[["entry_us", "costs.vp_set_per_bank_us"]].mean()
    per_run["status"] = "ok"
    fig, ax = new_figure((7.8, 4.4))
    line_plot(ax, per_run, "active_vps", "entry_us", log=True)
    sizes = np.array(sorted(per_run["active_vps"].unique()), dtype=float)
    if sizes.size:
        bank = float(per_run["costs.vp_set_per_bank_us"].iloc[0])
        words = np.ceil(sizes / EX_FROM_VPS) * (sizes > EX_FROM_VPS)
        shown = words > 0
        if shown.any():
            ax.plot(sizes[shown], words[shown] * bank, ":", color="grey", marker="s", ms=3,
                    label="mask's bank words alone (Ex)")
    ax.axvline(EX_FROM_VPS, color="grey", lw=0.6, ls="--")
    ax.annotate("Ex calls to the right", (EX_FROM_VPS, 0.0), xycoords=("data", "axes fraction"), ha="left",
                va="bottom", fontsize=7, color="grey", xytext=(3, 3), textcoords="offset points")
    _finish(fig, ax, "active_vps", "hypercall time before the fan-out, per shootdown (us)",
            "What a flush call costs before it reaches the targets: entry, decode, mask walk, bank words "
            "(VPs outside the active set idle)",
            True, True)
    return _save(fig, out_dir, name)


def large_partition_figures(points: pd.DataFrame, shootdowns: pd.DataFrame, out: Path) -> list[Path]:
    """The large-partitions study (experiments/large_partitions.toml)."""
    points = points.assign(others=_others(points))
    paths = advantage_figure(points, out)
    idle_busy = {"idle": "-", "busy": "--"}
    paths += size_panels_figure(points, "latency_p50_us", out, "latency_vs_vps",
                                "p50 shootdown latency vs partition size, dedicated, no broadcast; VPs outside the "
                                "active set idle (solid) or busy (dashed); dotted: VP 64", "others", idle_busy,
                                where=_baseline)
    # with the other VPs idle, guest work is the active share whatever the policy: only the busy runs show it
    paths += size_panels_figure(points, "guest_work_fraction", out, "guest_work_vs_vps",
                                "Useful guest work vs partition size, every VP busy (the VPs outside the active "
                                "set run other processes of the same size and load), dedicated, no broadcast",
                                "others", {"busy": "-"},
                                where=lambda d: _baseline(d)[lambda b: b["others"] == "busy"], logy=False)
    if "host.broadcast_flush" in points and points["host.broadcast_flush"].nunique() > 1:
        modes = dict(zip(["none", "invlpgb", "rar"], ["-", "--", ":"], strict=True))
        paths += size_panels_figure(
            points, "latency_p50_us", out, "broadcast_vs_vps",
            "p50 latency by how the hypervisor reaches the targets: IPIs (none, solid), INVLPGB (dashed), RAR "
            "(dotted); dedicated, VPs outside the active set idle", "host.broadcast_flush", modes,
            where=lambda d: d[(d["busy_vps_per_lp"] <= 1.0) & (d["others"] == "idle")])
    if "busy_vps_per_lp" in points and points["busy_vps_per_lp"].max() > 1.0:
        data = points.assign(lps=np.where(points["busy_vps_per_lp"] > 1.0, "2:1", "1:1"))
        over = data[(data["lps"] == "2:1") & (data["status"] == "ok")]
        unfinished = float(over["incomplete_fraction"].max()) if "incomplete_fraction" in over else 0.0
        note = (f"; 2:1 runs left up to {unfinished:.0%} of their arrivals unfinished (a VP waiting for an LP "
                "issues nothing: latency counts only issued shootdowns)" if unfinished > 0.005 else "")
        paths += size_panels_figure(
            data, "latency_p50_us", out, "overcommit_vs_vps",
            "p50 latency dedicated (1:1, solid) and overcommitted (2 busy VPs per LP, dashed); no broadcast, "
            "VPs outside the active set idle" + note, "lps", {"1:1": "-", "2:1": "--"},
            where=lambda d: d[(d["host.broadcast_flush"] == "none") & (d["others"] == "idle")])
    if {"hypercall_us", "fanout_us"} <= set(shootdowns.columns):
        paths += ex_call_figure(points, shootdowns, out)
    return paths


# ---------------------------------------------------------------- per experiment
def plot_sweep(directory: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The figures a sweep's spec asks for (its [plot] table), or a generic set."""
    points, shootdowns, manifest = load_sweep(directory)
    out = Path(out_dir) if out_dir else Path(directory) / "figures"
    plot = manifest["spec"].get("plot", {})
    kind = plot.get("kind", "generic")
    paths: list[Path] = []
    if kind == "overcommit":
        paths += pooled_latency_figure(points, shootdowns, "vps_per_lp", out, "latency_vs_overcommit",
                                       title="Shootdown latency vs overcommit")
        if "shootdowns_queued" in points:  # sweeps made since every arrival is a row
            paths += pooled_latency_figure(points, shootdowns, "vps_per_lp", out, "response_vs_overcommit",
                                           title="Shootdown response time vs overcommit (queueing included)",
                                           response=True)
        paths += metric_figure(points, "vps_per_lp", "lp_work_fraction", out, "guest_work_vs_overcommit",
                               title="Useful guest work vs overcommit")
        worst = points["vps_per_lp"].max()
        paths += cdf_figure(points, shootdowns, out, {"vps_per_lp": worst}, "latency_cdf_overcommitted")
        best = points["vps_per_lp"].min()
        paths += cdf_figure(points, shootdowns, out, {"vps_per_lp": best}, "latency_cdf_dedicated")
        from tlbsim.anatomy import anatomy_figure, sweep_anatomy
        from tlbsim.model.recorder import ANATOMY_COLUMNS

        if set(ANATOMY_COLUMNS) <= set(shootdowns.columns):  # sweeps made since the latency anatomy
            table = sweep_anatomy(points, shootdowns, ["vps_per_lp", "workload.policy"])
            paths += anatomy_figure(table, "vps_per_lp", out, x_label="VPs per LP",
                                    title="What shootdown latency is made of, by policy and overcommit")
        if "ops_per_s" in points and (points.get("workload.mode") == "closed").any():
            paths += metric_figure(points, "vps_per_lp", "ops_per_s", out, "throughput_vs_overcommit",
                                   title="Closed loop: operations per second vs overcommit")
    elif kind == "mask_vs_all":
        for vps, g in points.groupby("partition.vps"):
            paths += latency_figure(g, "fraction_targeted", out, f"latency_vs_fraction_{vps}vps",
                                    title=f"Mask vs ALL_PROCESSORS, {vps} VPs")
            paths += metric_figure(g, "fraction_targeted", "cost_per_shootdown_us", out,
                                   f"cost_vs_fraction_{vps}vps", title=f"Total cost per shootdown, {vps} VPs")
    elif kind == "scaling":
        paths += pooled_latency_figure(points, shootdowns, "partition.vps", out, "latency_vs_vps", logx=True,
                                       title="Shootdown latency vs partition size")
        paths += metric_figure(points, "partition.vps", "guest_work_fraction", out, "guest_work_vs_vps", logx=True,
                               title="Guest work fraction vs partition size")
    elif kind == "large_partitions":
        paths += large_partition_figures(points, shootdowns, out)
    elif kind == "vf":
        paths += vf_figures(points, shootdowns, out, plot.get("x", "vf.pf_call_rate_per_ms"), plot.get("hue"))
    elif kind == "locks":
        x = plot.get("x", "locks.vsm_rate_per_ms")
        hue_key = plot.get("hue")
        for metric, name in (("suspensions_per_shootdown", "suspensions"),
                             ("suspended_us_per_shootdown", "stall"), ("latency_p99_us", "latency_p99")):
            fig, ax = new_figure((7.6, 4.2))
            data, hue = _series(points, hue_key)
            line_plot(ax, data, x, metric, hue or "workload.policy", log=metric.startswith("latency"))
            _finish(fig, ax, x, LABELS.get(metric, metric), f"TLB locks: {LABELS.get(metric, metric)}",
                    metric.startswith("latency"))
            paths += _save(fig, out, f"locks_{name}")
    else:
        numeric = [k for k in manifest["spec"].get("grid", {}) if pd.api.types.is_numeric_dtype(points[k])]
        x = plot.get("x") or (numeric[0] if numeric else "point")
        paths += latency_figure(points, x, out, "latency")
        paths += metric_figure(points, x, "guest_work_fraction", out, "guest_work")
        paths += cdf_figure(points, shootdowns, out)
    return paths
