"""Latency anatomy: what a shootdown's latency is made of, from the anatomy columns of the shootdown
table (tlbsim.model.recorder.ANATOMY_COLUMNS: they add up to each row's latency).

Two views per group of rows (a policy, an overcommit level): the *typical* shootdown (the rows between
the 40th and 60th percentile of latency) and the *tail* (the rows at or above the 99th). Each is the
mean of every component over those rows, so a bar's segments add up to the band's mean latency. A
shootdown still in flight at the end counts with what it had spent (its latency's lower bound); one
never started (QUEUED) or failed has no anatomy and is left out. Used by ``tlbsim explain`` and by the
overcommit figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tlbsim.model.recorder import ANATOMY_PARTS

#: display names of the components that add up to the latency, in stacking order
COMPONENT_LABELS = {
    "local_flush_us": "own flush",
    "ipi_send_us": "IPI sends",
    "hypercall_us": "hypercall: entry, decode, walk",
    "fanout_us": "hypercall: reaching running targets",
    "spinning_us": "spinning for acks / a lock",
    "spin_exit_us": "pause-loop exits",
    "interrupts_us": "handling others' IPIs",
    "suspended_us": "suspended on a locked TLB",
    "descheduled_us": "initiator waiting for its LP",
    "other_us": "other (VTL1, VF, exits)",
}
#: the stacked components: hypercall_us is split into its walk and fan-out parts
STACK = ("local_flush_us", "ipi_send_us", "hypercall_walk_us", "fanout_us", "spinning_us", "spin_exit_us",
         "interrupts_us", "suspended_us", "descheduled_us", "other_us")
STACK_LABELS = {**COMPONENT_LABELS, "hypercall_walk_us": COMPONENT_LABELS["hypercall_us"]}
STACK_COLOURS = {"local_flush_us": "#9467bd", "ipi_send_us": "#ff7f0e", "hypercall_walk_us": "#1f77b4",
                 "fanout_us": "#aec7e8", "spinning_us": "#d62728", "spin_exit_us": "#ff9896",
                 "interrupts_us": "#c5b0d5", "suspended_us": "#8c564b", "descheduled_us": "#7f7f7f",
                 "other_us": "#bcbd22"}
BANDS = {"typical": (40.0, 60.0), "tail": (99.0, 100.0)}


def _rows(shootdowns: pd.DataFrame) -> pd.DataFrame:
    """The rows with an anatomy (completed, or in flight at the end), with ``elapsed_us`` (the latency,
    or what an unfinished one had spent) and ``hypercall_walk_us`` (hypercall time less fan-out)."""
    sd = shootdowns[shootdowns["status"].isin(["SUCCESS", "INCOMPLETE"])].copy()
    sd["elapsed_us"] = sd[list(ANATOMY_PARTS)].sum(axis=1)
    sd["hypercall_walk_us"] = (sd["hypercall_us"] - sd["fanout_us"]).clip(lower=0.0)
    return sd


def band_means(sd: pd.DataFrame) -> pd.DataFrame:
    """Rows ``typical`` and ``tail``: the mean of each stacked component over the band's rows, with
    ``elapsed_us`` (their mean latency, the sum of the components), ``n`` and the band's bounds."""
    out = []
    lat = sd["elapsed_us"].to_numpy(dtype=float)
    for band, (lo, hi) in BANDS.items():
        if not len(sd):
            out.append({"band": band, "n": 0, **{c: np.nan for c in (*STACK, "elapsed_us")}})
            continue
        a, b = np.percentile(lat, [lo, hi])
        sel = sd[(lat >= a) & (lat <= b)]
        row = {"band": band, "n": len(sel), "from_us": float(a), "to_us": float(b)}
        row.update({c: float(sel[c].mean()) for c in (*STACK, "elapsed_us")})
        out.append(row)
    return pd.DataFrame(out)


def anatomy_table(shootdowns: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """``band_means`` per group of ``by`` columns (none: the whole table)."""
    sd = _rows(shootdowns)
    if not by:
        return band_means(sd)
    frames = []
    for key, g in sd.groupby(by, sort=True, observed=True):
        t = band_means(g)
        for name, value in zip(by, key if isinstance(key, tuple) else (key,), strict=True):
            t.insert(0, name, value)
        frames.append(t)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def format_anatomy(table: pd.DataFrame, by: list[str] | None = None) -> str:
    """The anatomy as text: one block per group, a line per component with its mean in the typical
    and the tail band and its share of each."""
    lines = []
    groups = table.groupby(by, sort=False) if by else [((), table)]
    for key, g in groups:
        if by:
            names = key if isinstance(key, tuple) else (key,)
            lines.append(", ".join(f"{k} = {v}" for k, v in zip(by, names, strict=True)))
        bands = {r["band"]: r for _, r in g.iterrows()}
        typ, tail = bands.get("typical"), bands.get("tail")
        if typ is None or not typ["n"]:
            lines.append("  no completed or in-flight shootdown")
            continue
        lines.append(f"  {'component':<38} {'typical (p40-p60)':>22} {'tail (>= p99)':>22}")
        for c in STACK:
            t_us, l_us = max(typ[c], 0.0), max(tail[c], 0.0)  # -1e-13: rounding, not time
            if not (t_us > 1e-9 or l_us > 1e-9):
                continue
            lines.append(f"  {STACK_LABELS[c]:<38} {t_us:>12,.2f} us {_share(t_us, typ):>5} "
                         f"{l_us:>12,.2f} us {_share(l_us, tail):>5}")
        lines.append(f"  {'latency (sum)':<38} {typ['elapsed_us']:>12,.2f} us {'':>5} "
                     f"{tail['elapsed_us']:>12,.2f} us")
        lines.append(f"  {'shootdowns in the band':<38} {int(typ['n']):>15,} {'':>5} {int(tail['n']):>15,}")
    return "\n".join(lines)


def _share(value: float, band) -> str:
    total = band["elapsed_us"]
    return f"{100 * value / total:.0f}%" if total > 0 else ""


def anatomy_figure(table: pd.DataFrame, x: str, out_dir: Path, name: str = "latency_anatomy",
                   x_label: str | None = None, title: str = "What shootdown latency is made of") -> list[Path]:
    """Stacked bars of the anatomy: one panel per band (typical, tail), a group of bars per ``x`` level,
    one bar per policy (in the fixed policy order, labelled under the bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tlbsim.plots import policy_order

    policies = policy_order(table["workload.policy"].unique())
    levels = sorted(table[x].unique())
    fig, axes = plt.subplots(2, 1, figsize=(max(7.5, 0.5 * len(levels) * len(policies) + 3.5), 8.4),
                             layout="constrained")
    width = 0.8 / max(1, len(policies))
    for ax, band in zip(axes, BANDS, strict=True):
        t = table[table["band"] == band]
        ticks, tick_labels = [], []
        for i, level in enumerate(levels):
            for j, policy in enumerate(policies):
                row = t[(t[x] == level) & (t["workload.policy"] == policy)]
                pos = i + (j - (len(policies) - 1) / 2) * width
                ticks.append(pos)
                tick_labels.append(policy)
                if row.empty:
                    continue
                bottom = 0.0
                for c in STACK:
                    v = float(row[c].iloc[0])
                    if v > 0:
                        ax.bar(pos, v, width * 0.9, bottom=bottom, color=STACK_COLOURS[c], label=STACK_LABELS[c])
                        bottom += v
                ax.annotate(_plain_us(bottom), (pos, bottom), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(ticks, tick_labels, rotation=90, fontsize=7)
        for i, level in enumerate(levels):
            ax.annotate(f"{x_label or x} = {level:g}", (i, 0.97), xycoords=("data", "axes fraction"),
                        ha="center", va="top", fontsize=8)
        top = max((float(t[list(STACK)].sum(axis=1).max()) if len(t) else 0.0), 1e-9)
        ax.set_ylim(0.0, top * 1.3)  # room for the totals above the bars
        ax.set_ylabel(f"mean latency (us),\n{'p40-p60' if band == 'typical' else '>= p99'} shootdowns")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = [STACK_LABELS[c] for c in STACK if STACK_LABELS[c] in labels]
    handles = [handles[labels.index(lab)] for lab in order]
    fig.legend(handles, order, loc="outside right center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths


def _plain_us(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"



def sweep_anatomy(points: pd.DataFrame, shootdowns: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``anatomy_table`` of a sweep's shootdowns grouped by the points' ``keys`` (rows of the runs
    that finished: ``points.status == "ok"``), every replication pooled."""
    ok = points[points["status"] == "ok"] if "status" in points else points
    meta = ok[["point", "replication", *keys]].drop_duplicates(["point", "replication"])
    sd = shootdowns.merge(meta, on=["point", "replication"])
    return anatomy_table(sd, keys)


#: swept keys that only set the overcommit level: grouped by ``vps_per_lp`` instead
OVERCOMMIT_KEYS = ("host.guests", "partition.lps", "host.cotenants", "host.cotenant_vps")


def sweep_keys(points: pd.DataFrame, manifest: dict) -> list[str]:
    """The keys a sweep's anatomy is grouped by: the overcommit level if it varies (instead of the
    keys that set it), the policy, then every other swept key that varies."""
    spec = manifest["spec"]
    grid = [k for k in (*spec.get("grid", {}), *spec.get("zip", {})) if k in points and points[k].nunique() > 1]
    keys = []
    if any(k in OVERCOMMIT_KEYS for k in grid) and points["vps_per_lp"].nunique() > 1:
        keys.append("vps_per_lp")
    keys.append("workload.policy")
    return keys + [k for k in grid if k not in OVERCOMMIT_KEYS and k not in keys]


def explain(directory: str | Path) -> str:
    """The latency anatomy of a run directory (``tlbsim run --out``), per guest partition, or of a
    sweep directory, per policy and swept value."""
    import json

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    header = ("Latency anatomy: mean time per component of the typical shootdowns (p40-p60 of latency) and of "
              "the tail (>= p99);\nshares of each band's mean latency. Shootdowns in flight at the end count "
              "with what they had spent; QUEUED arrivals have no anatomy.")
    if manifest.get("kind") == "tlbsim-sweep":
        from tlbsim.plots import load_sweep

        points, shootdowns, manifest = load_sweep(directory)
        keys = sweep_keys(points, manifest)
        table = sweep_anatomy(points, shootdowns, keys)
        return header + "\n\n" + format_anatomy(table, keys)
    tables = manifest.get("tables", {})
    if "shootdowns" not in tables:
        replications = sorted(p.name for p in directory.glob("replication-*") if (p / "manifest.json").is_file())
        hint = f": explain one of its replications, e.g. {directory / replications[0]}" if replications else ""
        raise ValueError(f"{directory} holds no shootdown table (kind {manifest.get('kind', '?')!r}){hint}")
    shootdowns = pd.read_parquet(directory / tables["shootdowns"])
    by = ["partition", "policy"] if shootdowns["partition"].nunique() > 1 else ["policy"]
    return header + "\n\n" + format_anatomy(anatomy_table(shootdowns, by), by)
