"""Validation against published measurements of real systems (``tlbsim validate``).

A case (one TOML file in ``experiments/validation/``) maps a published setup
onto config keys and names the figures to compare::

    name = "hv_tlbflush_kvm"
    title = "..."
    source = "..."            # citation: where the published figures come from
    setup = "..."             # the published setup, in words
    mapping = "..."           # how it maps onto the model, and what it assumes
    reading = "..."           # an honest reading: where the model is off and why
    config = "../configs/default.toml"
    replications = 6
    quick = true              # part of --quick (CI)
    quick_replications = 3
    [fixed]                   # overrides for every point
    [[point]]                 # one simulated configuration per published one
    label = "ipi_12_12"
    set = { "workload.policy" = "ipi" }
    [[check]]                 # one comparison with a published figure
    kind = "ratio"            # ratio | value | at_most | at_least | less | increasing
    metric = "ops_per_s"
    numerator = "mask_12_12"  # point labels
    denominator = "ipi_12_12"
    published = 1.0
    tolerance = 0.10          # relative (ratio, value, at_most)
    why = "..."               # why this tolerance

Published figures are mostly ratios measured on one system; ratios are
compared, not absolute times. A ratio check is paired by replication
(every point of a replication runs with the same seed: common random
numbers): its interval is a Student t interval over the per-replication
ratios. Runs go through the sweep machinery (``--jobs``, ``--resume``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tlbsim import __version__
from tlbsim.config import ConfigError
from tlbsim.results import atomic_write_parquet, atomic_write_text, git_revision
from tlbsim.specs import read_spec
from tlbsim.stats import mean_ci

CASE_DIR = Path(__file__).resolve().parent.parent / "experiments" / "validation"
CHECK_KINDS = ("ratio", "value", "at_most", "at_least", "less", "increasing")
CASE_KEYS = {"name", "title", "source", "setup", "mapping", "reading", "config", "replications", "quick",
             "quick_replications", "quick_fixed", "fixed", "point", "check", "seed"}
CHECK_KEYS = {"kind", "metric", "numerator", "denominator", "point", "points", "published", "tolerance", "why",
              "label"}


@dataclass(frozen=True)
class Check:
    kind: str
    metric: str
    published: float | None
    tolerance: float
    why: str
    label: str
    numerator: str = ""
    denominator: str = ""
    points: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    title: str
    source: str
    setup: str
    mapping: str
    reading: str
    base: dict[str, Any]
    fixed: dict[str, Any]
    quick_fixed: dict[str, Any]
    points: tuple[tuple[str, dict[str, Any]], ...]
    checks: tuple[Check, ...]
    replications: int
    quick: bool
    quick_replications: int
    seed: int
    raw: dict[str, Any] = field(default_factory=dict)

    def spec(self, quick: bool):
        """The sweep that runs this case's points."""
        from tlbsim.sweep import Point, SweepSpec

        fixed = {**self.fixed, **(self.quick_fixed if quick else {})}
        points = tuple(Point(i, {**fixed, **overrides}) for i, (_, overrides) in enumerate(self.points))
        varied = tuple(sorted({k for _, o in self.points for k in o}))
        reps = self.quick_replications if quick else self.replications
        source = {"validation_case": self.raw, "quick": quick}
        spec = SweepSpec(f"validate-{self.name}", self.base, points, reps, self.seed, varied, source=source)
        for p in spec.points:
            try:
                spec.config(p)
            except ConfigError as e:
                raise ConfigError(e.key, f"{self.path}: point {self.points[p.index][0]!r}: "
                                  f"{str(e).split(': ', 1)[-1]}") from None
        return spec


def _text(data: dict, key: str, path: Path) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"{path}: needs a non-empty string {key!r}")
    return value.strip()


def load_case(path: str | Path) -> Case:
    path = Path(path)
    data, name, base = read_spec(path, "validation case", CASE_KEYS, base_key="config")
    fixed, quick_fixed = data.get("fixed", {}), data.get("quick_fixed", {})
    for key, table in (("fixed", fixed), ("quick_fixed", quick_fixed)):
        if not isinstance(table, dict):
            raise ConfigError(key, f"{path}: must be a table of config overrides")
    raw_points = data.get("point", [])
    if not isinstance(raw_points, list) or not raw_points:
        raise ConfigError("point", f"{path}: needs at least one [[point]]")
    points, labels = [], set()
    for i, p in enumerate(raw_points):
        if not isinstance(p, dict) or not isinstance(p.get("label"), str) or not isinstance(p.get("set", {}), dict):
            raise ConfigError(f"point[{i}]", f"{path}: a point has a label and a set = {{...}} table")
        if p["label"] in labels:
            raise ConfigError(f"point[{i}]", f"{path}: duplicate point label {p['label']!r}")
        labels.add(p["label"])
        points.append((p["label"], dict(p.get("set", {}))))
    raw_checks = data.get("check", [])
    if not isinstance(raw_checks, list) or not raw_checks:
        raise ConfigError("check", f"{path}: needs at least one [[check]]")
    checks = []
    for i, c in enumerate(raw_checks):
        key = f"check[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(key, f"{path}: must be a table")
        bad = set(c) - CHECK_KEYS
        if bad:
            raise ConfigError(f"{key}.{sorted(bad)[0]}", f"{path}: unknown check key")
        kind = c.get("kind")
        if kind not in CHECK_KINDS:
            raise ConfigError(f"{key}.kind", f"{path}: must be one of {', '.join(CHECK_KINDS)}")
        named = [c.get("numerator", ""), c.get("denominator", "")]
        for n in [c.get("point", ""), *c.get("points", [])]:  # a point, or a ratio of two: "a/b"
            named += str(n).split("/", 1)
        for n in named:
            if n and n not in labels:
                raise ConfigError(key, f"{path}: names point {n!r}, which is not a [[point]] label")
        published = c.get("published")
        if kind not in ("increasing", "less") and (not isinstance(published, int | float) or isinstance(published, bool)
                                     or not math.isfinite(published)):
            raise ConfigError(f"{key}.published", f"{path}: a {kind} check needs a finite published figure")
        tol = c.get("tolerance", 0.0)
        if not isinstance(tol, int | float) or not 0 <= tol < 10:
            raise ConfigError(f"{key}.tolerance", f"{path}: a relative tolerance in [0, 10)")
        if kind == "ratio" and not (c.get("numerator") and c.get("denominator")):
            raise ConfigError(key, f"{path}: a ratio check names a numerator and a denominator point")
        if kind in ("value", "at_most", "at_least") and not c.get("point"):
            raise ConfigError(key, f"{path}: a {kind} check names a point")
        if kind in ("less", "increasing") and len(c.get("points", [])) < 2:
            raise ConfigError(key, f"{path}: a {kind} check names at least two points, in order")
        checks.append(Check(kind, str(c.get("metric", "")), None if published is None else float(published),
                            float(tol), str(c.get("why", "")), str(c.get("label", f"{name}#{i}")),
                            c.get("numerator", "") or c.get("point", ""), c.get("denominator", ""),
                            tuple(c.get("points", []))))
        if not checks[-1].metric:
            raise ConfigError(f"{key}.metric", f"{path}: names the summary metric it compares")
    reps = data.get("replications", 5)
    quick_reps = data.get("quick_replications", min(3, reps) if isinstance(reps, int) else 3)
    for key, v in (("replications", reps), ("quick_replications", quick_reps)):
        if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 1000:
            raise ConfigError(key, f"{path}: an integer in 2..1000 (intervals need two replications)")
    seed = data.get("seed", 20261125)
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError("seed", f"{path}: an integer in 0..2^63-1")
    return Case(name, path, _text(data, "title", path), _text(data, "source", path), _text(data, "setup", path),
                _text(data, "mapping", path), _text(data, "reading", path), base, dict(fixed), dict(quick_fixed),
                tuple(points), tuple(checks), reps, bool(data.get("quick", False)), quick_reps, seed, data)


def load_cases(names: list[str] | None = None, quick: bool = False, directory: Path = CASE_DIR) -> list[Case]:
    files = sorted(directory.glob("*.toml"))
    cases = [load_case(f) for f in files]
    by_name = {c.name: c for c in cases}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConfigError("CASE", f"no validation case {missing[0]!r} (have: {', '.join(sorted(by_name))})")
        cases = [by_name[n] for n in names]
    elif quick:
        cases = [c for c in cases if c.quick]
    if not cases:
        raise ConfigError("CASE", f"no validation cases to run in {directory}")
    return cases


# ---------------------------------------------------------------- evaluation
def _per_rep(points: pd.DataFrame, case: Case, label: str, metric: str) -> pd.Series:
    index = [lbl for lbl, _ in case.points].index(label)
    rows = points[(points["point"] == index) & (points["status"] == "ok")]
    if metric not in rows:
        raise ConfigError("metric", f"{case.path}: the summary has no metric {metric!r}")
    return rows.set_index("replication")[metric].astype(float)


def evaluate(case: Case, points: pd.DataFrame) -> list[dict]:
    """One row per check: published, simulated (mean and 95 % interval), ratio to published, verdict."""
    rows = []
    for chk in case.checks:
        row: dict[str, Any] = {"case": case.name, "check": chk.label, "kind": chk.kind, "metric": chk.metric,
                               "published": chk.published, "tolerance": chk.tolerance, "why": chk.why,
                               # an ordering check's points, in order, and each one's mean and 95 % interval
                               "levels": [], "level_mean": [], "level_low": [], "level_high": []}
        if chk.kind == "ratio":
            num = _per_rep(points, case, chk.numerator, chk.metric)
            den = _per_rep(points, case, chk.denominator, chk.metric)
            per = (num / den).dropna()
            row["compared"] = f"{chk.metric}: {chk.numerator} / {chk.denominator}"
        elif chk.kind in ("value", "at_most", "at_least"):
            num, _, den = chk.numerator.partition("/")
            per = _per_rep(points, case, num, chk.metric)
            if den:
                per = per / _per_rep(points, case, den, chk.metric)
            per = per.dropna()
            row["compared"] = f"{chk.metric} of {chk.numerator}"
        else:
            series = []
            for p in chk.points:
                num, _, den = p.partition("/")
                s = _per_rep(points, case, num, chk.metric)
                series.append(s / _per_rep(points, case, den, chk.metric) if den else s)
            means = [float(s.mean()) for s in series]
            row["levels"] = list(chk.points)
            for stats in (mean_ci(s.to_numpy()) for s in series):
                for key, v in zip(("level_mean", "level_low", "level_high"), stats, strict=True):
                    row[key].append(v)
            row["compared"] = f"{chk.metric}: " + " < ".join(chk.points)
            row["simulated"] = means[-1] / means[0] if chk.kind == "increasing" and means[0] else math.nan
            row["low"] = row["high"] = math.nan
            row["ratio_to_published"] = math.nan
            ok = all(b > a for a, b in zip(means, means[1:], strict=False))
            row["detail"] = " -> ".join(f"{m:.4g}" for m in means)
            row["verdict"] = "holds" if ok else "MISS"
            rows.append(row)
            continue
        mean, low, high = mean_ci(per.to_numpy())
        row.update(simulated=mean, low=low, high=high, detail=f"n={len(per)}")
        row["ratio_to_published"] = mean / chk.published if chk.published else math.nan
        if chk.kind == "at_most":
            ok = mean <= chk.published * (1 + chk.tolerance)
        elif chk.kind == "at_least":
            ok = mean >= chk.published * (1 - chk.tolerance)
        else:
            ok = chk.published != 0 and abs(mean / chk.published - 1) <= chk.tolerance
        row["verdict"] = "holds" if ok else "MISS"
        rows.append(row)
    return rows


def run_cases(cases: list[Case], out: Path, quick: bool = False, jobs: int | None = None, resume: bool = False,
              progress: bool = False, dask_scheduler: str | None = None, dask_local: int | None = None) -> pd.DataFrame:
    from tlbsim.sweep import configs_digest, run_sweep

    out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in cases:
        case_dir = out / case.name
        spec = case.spec(quick)
        # the model, the case file and every run's resolved configuration (its base config may have changed)
        stamp = f"{fingerprint([case])}-{configs_digest(spec)}"
        _forget_if_stale(case_dir, stamp)
        outcome = run_sweep(spec, case_dir, jobs=jobs, resume=resume, progress=progress,
                            dask_scheduler=dask_scheduler, dask_local=dask_local)
        atomic_write_text(case_dir / FINGERPRINT_FILE, stamp)
        if outcome.failed:
            point, rep, err = outcome.failed[0]
            raise ConfigError(case.name, f"{len(outcome.failed)} runs failed (point {point} replication {rep}: {err})")
        results.extend(evaluate(case, outcome.points))
        figure(case, pd.DataFrame([r for r in results if r["case"] == case.name]), out / "figures")
    table = pd.DataFrame(results)
    atomic_write_parquet(table, out / "validation.parquet")
    manifest = {"kind": "tlbsim-validation", "quick": quick, "cases": [c.name for c in cases],
                "case_files": {c.name: str(c.path) for c in cases}, "fingerprint": fingerprint(cases),
                "version": __version__, "git_revision": git_revision(), "tables": {"validation": "validation.parquet"},
                "python": sys.version.split()[0]}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str))
    return table


FINGERPRINT_FILE = "model-fingerprint.txt"


def _forget_if_stale(case_dir: Path, stamp: str) -> None:
    """A case's runs are reused (resumed) only if the model and the case are the ones that made them:
    a case directory with another fingerprint, or none, is this validation's own stale cache, and is
    removed so that the case is computed again (resuming would mix old and new model runs)."""
    if not case_dir.is_dir() or not (case_dir / "spec.json").exists():
        return
    stamp_file = case_dir / FINGERPRINT_FILE
    old = stamp_file.read_text().strip() if stamp_file.exists() else ""
    if old != stamp:
        print(f"tlbsim validate: {case_dir.name}: the model or the case changed since its runs; computing it again",
              file=sys.stderr)
        shutil.rmtree(case_dir)


def fingerprint(cases: list[Case]) -> str:
    """A hash of the model's source and the case files: docs/validation.md records the one its numbers
    came from, and a test fails when either changed since (the doc cannot drift from the code)."""
    h = hashlib.sha256()
    model = Path(__file__).resolve().parent
    for f in sorted([*model.glob("model/*.py"), model / "config.py", model / "records.py", model / "hv.py",
                     model / "runner.py"]):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for c in sorted(cases, key=lambda c: c.name):
        h.update(c.path.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- output
def format_table(table: pd.DataFrame) -> str:
    """One line per check; every column as wide as its longest entry (names are never cut)."""
    cells = []
    for r in table.itertuples():
        pub = "-" if r.published is None or (isinstance(r.published, float) and math.isnan(r.published)) \
            else f"{r.published:.4g}"
        if r.kind in ("increasing", "less"):
            sim = r.detail
        elif math.isnan(r.low):
            sim = f"{r.simulated:.4g}"
        else:
            sim = f"{r.simulated:.4g} [{r.low:.4g}, {r.high:.4g}]"
        ratio = "-" if math.isnan(r.ratio_to_published) else f"{r.ratio_to_published:.2f}"
        tol = "-" if r.kind in ("increasing", "less") else f"{r.tolerance:.0%}"
        cells.append((r.case, r.check, pub, sim, ratio, tol, r.verdict))
    names = ("case", "check", "published", "simulated [95% CI]", "ratio", "tol", "verdict")
    widths = [max([len(n), *(len(str(c[i])) for c in cells)]) for i, n in enumerate(names)]
    right = (False, False, True, True, True, True, False)

    def line(row) -> str:
        out = [f"{str(v):>{w}s}" if r else f"{str(v):{w}s}" for v, w, r in zip(row, widths, right, strict=True)]
        return (" ".join(out[:6]) + "  " + out[6]).rstrip()

    head = line(names)
    return "\n".join([head, "-" * len(head), *(line(c) for c in cells)])


NUMERIC_KINDS = ("ratio", "value", "at_most", "at_least")
PUBLISHED_COLOUR, SIMULATED_COLOUR = "#555555", "#1f77b4"


def draw_figure(case: Case, rows: pd.DataFrame):
    """The figure of a case's checks, on the same axes, left to right: a check against a published figure
    is a pair of bars (published, simulated with its 95 % interval); an ordering check (increasing, less)
    is one bar per point it compares, in order, each with its 95 % interval and its point's label and
    mean above it (the source gives a direction, not a figure: no published bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tlbsim.plots import wrap

    checks = list(rows.itertuples())
    slots = sum(2 if r.kind in NUMERIC_KINDS else max(1, len(r.levels)) for r in checks) + 0.6 * len(checks)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.95 * slots + 1.6), 4.2), layout="constrained")
    ticks, tick_labels, tops, ratio = [], [], [0.0], []
    legend = {"published": True, "simulated (95 % CI)": True}

    def bar(x, height, colour, name, low=math.nan, high=math.nan):
        err = None if math.isnan(low) else [[height - low], [high - height]]
        ax.bar(x, height, width=0.8, yerr=err, capsize=4, color=colour, label=name if legend.pop(name, False)
               else "_nolegend_")
        tops.append(max(height, high) if not math.isnan(high) else height)

    pos = 0.0
    for r in checks:
        if r.kind in NUMERIC_KINDS:
            bar(pos, r.published, PUBLISHED_COLOUR, "published")
            bar(pos + 1, r.simulated, SIMULATED_COLOUR, "simulated (95 % CI)", r.low, r.high)
            centre, width = pos + 0.5, 2
            ratio.append(r.kind == "ratio" or "/" in str(getattr(r, "compared", "")).split(" of ")[-1])
        else:
            levels = list(r.levels)
            for i, (label, mean, low, high) in enumerate(zip(levels, r.level_mean, r.level_low, r.level_high,
                                                             strict=True)):
                bar(pos + i, mean, SIMULATED_COLOUR, "simulated (95 % CI)", low, high)
                name = label.replace("/", " /\n")  # a ratio of two points on two lines
                ax.annotate(f"{name}\n{mean:.3g}", (pos + i, tops[-1]),
                            xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=7)
            width = max(1, len(levels))
            centre = pos + (width - 1) / 2
            ratio.append(all("/" in lv for lv in levels))
        ticks.append(centre)
        tick_labels.append(wrap(f"{r.check} ({r.verdict})", 12 * width + 4))
        pos += width + 0.6
    ax.set_xticks(ticks, tick_labels, fontsize=7)
    ax.set_xlim(-0.7, pos - 0.9)
    ax.set_ylim(0, max(tops) * 1.3 or 1.0)  # room for the level labels above the bars
    what = ", ".join(sorted(set(rows["metric"])))
    y_label = f"ratio of {what}" if all(ratio) else what if not any(ratio) else \
        f"{what} (ratio where a check compares two)"
    ax.set_ylabel(wrap(y_label, 45), fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(wrap(case.title, 70), fontsize=9)
    return fig


def figure(case: Case, rows: pd.DataFrame, out_dir: Path) -> Path | None:
    """Published vs simulated (95 % interval) for each check of a case (``draw_figure``), as PNG."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig = draw_figure(case, rows)
    path = out_dir / f"{case.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_docs(cases: list[Case], table: pd.DataFrame, figures: Path, doc: Path, quick: bool) -> None:
    """docs/validation.md: every case, its setup, mapping, result (table and figure), and reading."""
    import shutil

    fig_dir = doc.parent / "figures" / "validation"
    fig_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Validation: how far tlbsim is from published measurements", "",
             "Generated by `tlbsim validate --docs docs/validation.md` (`make validate`); do not edit by hand.",
             f"Model fingerprint `{fingerprint(cases)}` (a test fails when the model or a case changed since).",
             f"Run: {'quick subset' if quick else 'full suite'}, tlbsim {__version__}, git {git_revision()}.", "",
             "Each case maps a published setup onto config keys (`experiments/validation/*.toml`), compares the",
             "published figures (mostly ratios measured on one system) with the simulated ones (mean and 95 %",
             "Student t interval over replications, paired by seed), and states a tolerance and why. Misses",
             "are shown as misses.", "", "## Summary", "", "```", format_table(table), "```", ""]
    for case in cases:
        rows = table[table["case"] == case.name]
        lines += [f"## {case.title} (`{case.name}`)", "", f"**Source.** {case.source}", "",
                  f"**Setup.** {case.setup}", "", f"**Mapping and assumptions.** {case.mapping}", "",
                  "| check | compared | published | simulated (95 % CI) | tolerance | verdict |",
                  "|---|---|---|---|---|---|"]
        for r in rows.itertuples():
            sim = r.detail if r.kind in ("increasing", "less") else (
                f"{r.simulated:.4g}" + ("" if math.isnan(r.low) else f" [{r.low:.4g}, {r.high:.4g}]"))
            pub = "-" if r.published is None or (isinstance(r.published, float) and math.isnan(r.published)) \
                else f"{r.published:.4g}"
            tol = "-" if r.kind in ("increasing", "less") else f"{r.tolerance:.0%}: {r.why}"
            lines.append(f"| {r.check} | {r.compared} | {pub} | {sim} | {tol} | {r.verdict} |")
        src = figures / f"{case.name}.png"
        if src.exists():
            shutil.copyfile(src, fig_dir / src.name)
            lines += ["", f"![{case.name}](figures/validation/{src.name})"]
        lines += ["", f"**Reading.** {case.reading}", ""]
    atomic_write_text(doc, "\n".join(lines))
